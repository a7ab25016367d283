"""The capability record: every built-in policy carries a valid one, wrong values are named when a policy is built,
and policies written against the older attribute protocol are translated in one place."""
import threading

import pytest

from vla_bench.errors import VlaBenchError
from vla_bench.policies import BuildContext, Capabilities, ModelCache, build_policy, capabilities_of, check_policy
from vla_bench.registry import Registry


@pytest.mark.parametrize("name, images, privileged, in_worker", [
    ("expert", False, True, True), ("noop", False, False, True), ("random", False, False, True),
])
def test_builtin_policies_declare_what_they_need(name, images, privileged, in_worker):
    registry = Registry.load()
    policy = build_policy(registry.get(name), BuildContext(registry, "libero_spatial", ModelCache()))
    record = capabilities_of(policy)
    assert (record.images, record.privileged, record.in_worker) == (images, privileged, in_worker)
    assert record.rendered_cameras == ()  # state-only policies make the simulator render nothing


@pytest.mark.parametrize("fields, named", [
    (dict(images="yes"), "capabilities.images must be True or False"),
    (dict(cameras="agentview"), "capabilities.cameras must be a tuple"),
    (dict(images=True, cameras=("agentview", "frontview")), "unknown camera(s) frontview; valid: agentview, robot0_eye_in_hand"),
    (dict(images=True, cameras=()), "no camera is named"),
    (dict(frame_transform=42), "frame_transform must be callable"),
    (dict(action_size=0), "action_size must be an integer >= 1"),
    (dict(chunk_length=2.5), "chunk_length must be an integer >= 1"),
])
def test_a_wrong_record_is_named_with_the_entry(fields, named):
    class Wrong:
        capabilities = Capabilities(**fields)

        def reset(self, slot, seed): ...

        def act(self, observations, instructions, slots): ...

    with pytest.raises(VlaBenchError) as e:
        capabilities_of(Wrong(), "checkpoints.toml: [checkpoints.mine]: ")
    assert named in str(e.value) and str(e.value).startswith("checkpoints.toml: [checkpoints.mine]: ")


def test_an_in_worker_policy_that_cannot_travel_is_refused_before_any_worker_starts():
    class Unpicklable:
        capabilities = Capabilities(in_worker=True)

        def __init__(self):
            self.lock = threading.Lock()

    with pytest.raises(VlaBenchError, match="in_worker is True but Unpicklable cannot be pickled"):
        check_policy(Unpicklable())
    assert capabilities_of(Unpicklable()).in_worker  # reading the record does not pickle the policy


def test_something_else_than_a_record_is_refused():
    class Dict:
        capabilities = {"images": True}

    with pytest.raises(VlaBenchError, match="must be a vla_bench Capabilities record, got dict"):
        capabilities_of(Dict())


def test_the_older_attribute_protocol_is_translated():
    def transform(obs):
        return obs

    class Legacy:
        needs_images = True
        needs_privileged = True
        runs_in_worker = False
        observation_transform = staticmethod(transform)

    record = capabilities_of(Legacy())
    assert record.images and record.privileged and record.ground_truth and not record.in_worker
    assert record.frame_transform is transform and record.rendered_cameras == ("agentview",)
    assert capabilities_of(object()) == Capabilities()  # nothing declared: the record's own defaults


def test_a_video_adds_the_agentview_and_only_it():
    """The simulator renders the policy's cameras, plus the agentview when episodes are recorded, nothing more."""
    wrist = Capabilities(images=True, cameras=("robot0_eye_in_hand",))
    assert wrist.cameras_to_render(False) == ("robot0_eye_in_hand",)
    assert wrist.cameras_to_render(True) == ("robot0_eye_in_hand", "agentview")
    assert Capabilities(images=True).cameras_to_render(True) == ("agentview",)  # not twice
    assert Capabilities().cameras_to_render(False) == () and Capabilities().cameras_to_render(True) == ("agentview",)
