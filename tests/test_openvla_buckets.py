"""No graph captures mid-run: batch buckets, the policy's warm-up, uint8 frames normalized on the device, and the
random full-size snapshot's tokenizer (tiny model on the CPU; the CPU path counts built states where CUDA counts
captured graphs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vla_bench.openvla import checkpoint, image, tiny
from vla_bench.openvla.fast_generator import BATCH_BUCKETS, FastGenerator, batch_bucket, batch_buckets_upto
from vla_bench.openvla.frames import FrameChain
from vla_bench.openvla.lora import BaseModel
from vla_bench.openvla.policy import OpenVLAPolicy
from vla_bench.openvla.prompt import build_prompt


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    root = tmp_path_factory.mktemp("buckets")
    return checkpoint.load_snapshot(tiny.write_tiny_snapshot(root / "snap", tiny.build_tokenizer(root / "tok")),
                                    device="cpu")


def _frames(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)]


def _prepared(policy, frames):
    """Observations whose frame an env worker has prepared already (what the policy reads in a closed loop)."""
    return [{FrameChain.PREPARED: (policy.observation_transform, f)} for f in frames]


# ---- buckets --------------------------------------------------------------------------------------------------------
@given(st.integers(1, 1000))
def test_a_batch_runs_in_a_bucket_that_wastes_at_most_half_below_16_and_a_third_above(batch):
    """A batch of B rows runs in the smallest listed bucket >= B (beyond the list, the next multiple of 64): never
    fewer rows, fewer than 2B rows below 16 and at most 1.5B from 16 on, and warming the buckets up to B's covers
    every smaller batch's bucket."""
    rows = batch_bucket(batch)
    assert rows >= batch
    assert rows in BATCH_BUCKETS or (rows > BATCH_BUCKETS[-1] and rows % 64 == 0)
    assert rows < 2 * batch if batch < 16 else rows <= 1.5 * batch
    assert not [b for b in BATCH_BUCKETS if batch <= b < rows]
    warmed = batch_buckets_upto(batch)
    assert warmed == sorted(set(warmed)) and warmed[-1] == rows
    assert {batch_bucket(b) for b in range(1, batch + 1)} == set(warmed)


def test_padding_rows_change_no_real_row(snapshot):
    """A call of 3, 5 or 6 rows runs padded to 4 or 8 rows and returns the tokens of the unpadded plain path (and of
    each row decoded alone), its logits within float noise; the padded rows' outputs are dropped."""
    model = snapshot.model
    texts = [t.language for t in _suite_tasks("libero_spatial")]
    fast = FastGenerator(model)
    for n, seed in ((3, 1), (5, 2), (6, 3)):
        pv = image.to_pixel_values(_frames(n, seed), model.arch.timm_model_ids)
        prompts = [snapshot.tokenizer.encode(build_prompt(t)) for t in texts[:n]]
        ids, logits = fast.generate(pv, prompts, return_logits=True)
        ref, ref_logits = model.generate(pv, prompts, return_logits=True)
        assert ids.shape == (n, 7)
        assert torch.equal(ids, ref) and torch.allclose(logits, ref_logits, atol=5e-4)
        for i in range(n):
            assert torch.equal(fast.generate(pv[i:i + 1], prompts[i:i + 1])[0], ids[i])
    assert {key[2] for key in fast._states} == {1, 4, 8}, "the calls should have run in buckets only"
    assert len({tuple(r) for r in ids.tolist()}) > 1, "the tiny model ignores its inputs; the test would be vacuous"


def test_padded_policy_calls_give_each_rows_own_actions(snapshot):
    """The policy's actions for a batch of 5 (run as 8) equal those of each observation asked alone."""
    policy = OpenVLAPolicy(BaseModel(snapshot), "libero_spatial")
    texts = policy.instructions()[:5]
    obs = _prepared(policy, _frames(5, seed=4))
    batch = policy.infer(obs, texts).actions
    alone = np.concatenate([policy.infer(obs[i:i + 1], texts[i:i + 1]).actions for i in range(5)])
    assert np.array_equal(batch, alone)


# ---- warm-up --------------------------------------------------------------------------------------------------------
def test_after_prepare_no_batch_size_up_to_the_maximum_captures(snapshot):
    """prepare(max_batch) builds one state per (batch bucket, prompt bucket) of the suite's instructions; then calls
    of every size 1..max_batch over those instructions build nothing, a second prepare builds nothing, and only a
    call outside what was prepared (a larger batch, a longer prompt) builds a new one."""
    policy = OpenVLAPolicy(BaseModel(snapshot), "libero_spatial")
    generator = policy.base.generator
    texts = policy.instructions()
    lengths = {FastGenerator.text_bucket(len(snapshot.tokenizer.encode(build_prompt(t)))) for t in texts}
    assert len(lengths) > 1, "the suite's prompts should span several text buckets, or the test checks less"
    built = policy.prepare(4)
    assert built == len(lengths) * len(batch_buckets_upto(4)) == generator.captures
    frames = _frames(4, seed=5)
    for n in range(1, 5):
        for offset in range(0, len(texts), n):  # every instruction, in batches of n
            rows = [texts[(offset + i) % len(texts)] for i in range(n)]
            policy.infer(_prepared(policy, frames[:n]), rows)
    assert generator.captures == built
    assert policy.prepare(4) == 0 and policy.prepare(3, texts[:2]) == 0
    policy.infer(_prepared(policy, _frames(5)), texts[:5])  # 5 rows: bucket 8, not prepared
    assert generator.captures == built + 1
    policy.infer(_prepared(policy, _frames(1)), [" ".join(texts)])  # a prompt longer than any prepared one
    assert generator.captures == built + 2


def test_prepare_refuses_what_it_cannot_warm(snapshot):
    """A non-positive or non-integer max_batch is refused, and an open-loop suite needs its instructions given."""
    policy = OpenVLAPolicy(BaseModel(snapshot), "libero_spatial")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_batch"):
            policy.prepare(bad)
    bridge = OpenVLAPolicy(BaseModel(snapshot), "bridge_v2")
    with pytest.raises(Exception, match="open-loop suite.*prepare"):
        bridge.prepare(2)
    assert bridge.prepare(2, ["put the spoon on the towel"]) == len(batch_buckets_upto(2))


# ---- frames on the device -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False], ids=["dinosiglip", "siglip"])
def test_device_normalization_equals_the_cpu_path(fused):
    """uint8 frames normalized on the device (here the CPU, and CUDA where present) equal the CPU float32 path:
    exactly in float32, and as its values cast in bfloat16; both equal (x / 255 - mean) / std computed in numpy from
    timm's configs, channel blocks in tower order."""
    ids = ("vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224")[(0 if fused else 1):]
    frames = _frames(3, seed=6)
    ref = image.to_pixel_values(frames, ids)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        got = image.pixel_values_on(frames, ids, torch.device(device), torch.float32)
        assert got.device.type == device and got.dtype == torch.float32
        assert torch.allclose(got.cpu(), ref, atol=1e-6, rtol=0)
        half = image.pixel_values_on(frames, ids, torch.device(device), torch.bfloat16)
        assert half.dtype == torch.bfloat16 and torch.equal(half.cpu(), ref.to(torch.bfloat16))
    x = np.stack(frames).astype(np.float64).transpose(0, 3, 1, 2) / 255.0
    for k, (mean, std) in enumerate(image.backbone_norms(ids)):
        expected = (x - np.array(mean)[None, :, None, None]) / np.array(std)[None, :, None, None]
        assert np.allclose(ref[:, 3 * k:3 * k + 3].numpy(), expected, atol=1e-5)
    assert ref.shape == (3, 3 * len(ids), 224, 224)
    with pytest.raises(ValueError, match="uint8"):
        image.pixel_values_on([f.astype(np.float32) for f in frames], ids, torch.device("cpu"), torch.float32)


def test_the_policy_feeds_the_model_device_normalized_frames(snapshot, monkeypatch):
    """The policy's pixel values are the device path's, not a float32 tensor made on the host: infer gives the
    same tokens as the generator fed to_pixel_values directly."""
    policy = OpenVLAPolicy(BaseModel(snapshot), "libero_spatial")
    seen = []
    real = image.pixel_values_on
    monkeypatch.setattr(image, "pixel_values_on", lambda *a, **k: seen.append(a) or real(*a, **k))
    frames = _frames(2, seed=7)
    texts = policy.instructions()[:2]
    out = policy.infer(_prepared(policy, frames), texts)
    assert len(seen) == 1 and seen[0][2] == snapshot.model.device and seen[0][3] == snapshot.model.dtype
    pv = image.to_pixel_values(frames, snapshot.model.arch.timm_model_ids)
    ref = FastGenerator(snapshot.model).generate(pv, [snapshot.tokenizer.encode(build_prompt(t)) for t in texts])
    assert np.array_equal(out.tokens, ref.numpy())


def _suite_tasks(suite):
    from vla_bench.envs.tasks import suite_tasks

    return suite_tasks(suite)


# ---- the engine warms up before the first episode --------------------------------------------------------------------
class _FrameEnv:
    """A stand-in simulator of `n` slots serving 256x256 agentview frames; episodes of different lengths end at
    different steps, so the batches shrink and grow through every size."""

    def __init__(self, n):
        self.n, self.state = n, {}

    def _obs(self, slot):
        init, t = self.state[slot]
        frame = np.random.default_rng(1000 * init + t).integers(0, 256, (256, 256, 3), dtype=np.uint8)
        return {"agentview_image": frame}

    def reset(self, requests):
        from vla_bench.engine.pool import Answer

        for slot, (init, _seed) in requests.items():
            self.state[slot] = (init, 0)
        return {slot: Answer(self._obs(slot)) for slot in requests}

    def step(self, actions):
        from vla_bench.engine.pool import Answer

        out = {}
        for slot in actions:
            init, t = self.state[slot]
            self.state[slot] = (init, t + 1)
            out[slot] = Answer(self._obs(slot), done=t + 1 >= 2 + init % 5)
        return out


def test_the_engine_prepares_every_batch_it_will_form_so_no_capture_happens_mid_run(snapshot):
    """A session's scheduler over 5 slots in 2 groups, two tasks' instructions, episodes of 2..6 steps: all graphs
    (CPU: states) are built by the warm-up before the first episode, none while the episodes run, and batches of
    several sizes did run."""
    from tests.fake_pool import FakePool
    from vla_bench.engine.pool import EnvSpec
    from vla_bench.engine.scheduler import Job, Scheduler
    from vla_bench.protocol import reference_protocol

    base = BaseModel(snapshot)
    policy = OpenVLAPolicy(base, "libero_spatial")
    protocol = reference_protocol("libero_spatial", episodes=12, max_steps=8)
    texts = [t.language for t in _suite_tasks("libero_spatial")]
    scheduler = Scheduler(FakePool(_FrameEnv(5)), groups=2)
    for task in (0, 7):
        scheduler.add(Job(f"task{task}", [policy], EnvSpec(protocol, task, ("agentview",)), texts[task], range(12),
                          lambda i: i, lambda o: None))
    scheduler._prepare()
    warmed = base.generator.captures
    assert warmed > 0
    scheduler.run()
    assert base.generator.captures == warmed  # nothing built after the warm-up
    assert len(scheduler.stats.batches) >= 3 and scheduler.stats.episodes == 24
