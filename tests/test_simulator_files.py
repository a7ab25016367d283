"""What the simulator leaves behind: nothing in the user's working directory (MuJoCo writes MUJOCO_LOG.TXT into
the working directory on every simulator warning)."""
import os

import numpy as np
import pytest

from tests.fake_pool import PoolEnv
from vla_bench.protocol import reference_protocol

pytestmark = pytest.mark.sim


def warn_like_an_unstable_simulation(obs: dict) -> dict:
    """An observation transform (it runs inside the env worker) that makes MuJoCo warn, as an unstable scene does."""
    import mujoco

    model = mujoco.MjModel.from_xml_string('<mujoco><worldbody><body><joint name="j" type="slide"/>'
                                           '<geom size=".1"/></body></worldbody><actuator><motor joint="j"/>'
                                           '</actuator></mujoco>')
    data = mujoco.MjData(model)
    data.ctrl[:] = np.nan
    mujoco.mj_step(model, data)
    obs["worker_cwd"] = os.getcwd()
    return obs


def test_mujoco_warnings_in_env_workers_leave_no_log_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    protocol = reference_protocol("libero_spatial", episodes=1, max_steps=1)
    with PoolEnv(protocol, 0, 1, (), False, transform=warn_like_an_unstable_simulation) as env:
        result = env.reset({0: (0, protocol.episode_seed(0, 0))})[0]
    assert result.error is None, result.error
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()
    assert os.listdir(tmp_path) == []
    assert result.obs["worker_cwd"] != str(tmp_path) and not os.path.exists(result.obs["worker_cwd"])  # cleaned up
