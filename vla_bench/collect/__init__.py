"""`vla-bench collect`: scripted-expert demonstrations in LIBERO's HDF5 layout, in parallel, resumable.

One file per task, `OUT/<suite>/<task name>_demo.hdf5` (LIBERO's own file naming, so OpenVLA's rule that reads the
instruction from the file name gives the same text as the stored problem_info). Each demo holds what LIBERO's
`create_dataset.py` stores, recorded after the protocol's wait steps, one row per control step (the observation
*before* the step's action): actions, states (flattened MuJoCo state), robot_states, obs/agentview_rgb,
obs/eye_in_hand_rgb (as rendered, upside down; OpenVLA's conversion and our eval flip them), obs/ee_states
(pos + axis-angle), obs/gripper_states, obs/joint_states. Only successful episodes are kept, as in OpenVLA's
regeneration of the LIBERO data.

Episodes start from LIBERO's own random placement (`env.reset()` samples every object and fixture from its BDDL
region with the global NumPy RNG), seeded per demo, never from the 50 fixed evaluation init states: training on
those would leak the test set. Attempt j of task t uses seed `demo_seed(seed, t, j)`; the seed is stored in the
demo's attributes and the state right after the reset in its `init_state`, so a demo can be replayed.

The package's modules, one job each: episode.py records one expert episode in a worker (and the action noise);
writer.py owns the per-task HDF5 files (creation, resume state, failed seeds); runner.py is the worker pool that
dispatches attempts in order and writes results in order; cli.py is `vla-bench collect`.
"""
