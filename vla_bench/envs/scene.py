"""Privileged scene facts for policies that read the simulator (the scripted expert): `describe_scene(env)`.

The env worker calls this on every step when a policy's capabilities say `privileged` and puts the result in
obs["scene"]. The result crosses a process pipe, so it holds only plain Python and NumPy data. It has two parts:

- a static part that depends only on the MuJoCo model (which geoms belong to which object, their local extents,
  goal predicates, region sizes). It is computed once per model and cached on the env object; a soft reset
  (`hard_reset=False`) keeps the model, a hard reset builds a new one and so a new cache entry.
- a dynamic part read from `sim.data` each call: world poses of objects, collision geoms, region sites, fixture
  joint positions, and the truth value of each goal predicate. Fixtures are re-placed on every reset through
  `model.body_pos`, so their geoms' world poses are part of the dynamic read as well.

Keys: goal (BDDL goal predicates, lower case), goal_done (each one's truth now), names / is_fixture / classes (the
entities: objects then fixtures), pos / mat (their body poses), geom_owner / geom_body / geom_pos / geom_mat /
geom_half / geom_type (collision geoms of entities), sites (region sites: pos, mat, half, parent), site_joints
(region -> its drawer's joints), articulations (slide/hinge joints: qpos, world axis and anchor, body, owner),
articulation_ranges (an entity's open/close/turn-on qpos ranges), joints (qpos per entity), robot_base.

Conventions: positions in metres in the world frame; rotations as 3x3 matrices (no quaternion order to get wrong);
a geom's shape is an oriented box: centre `geom_pos`, axes the columns of `geom_mat`, half extents `geom_half`.
Works with robosuite 1.4 on mujoco 2.3 and mujoco 3.x, through `sim.model` / `sim.data` only.
"""
from __future__ import annotations

import numpy as np

_CACHE_ATTR = "_vla_bench_scene_static"

# MuJoCo geom type codes (mjtGeom), stable across mujoco 2.x and 3.x
_PLANE, _HFIELD, _SPHERE, _CAPSULE, _ELLIPSOID, _CYLINDER, _BOX, _MESH = 0, 1, 2, 3, 4, 5, 6, 7


def describe_scene(env) -> dict:
    """Facts about the LIBERO scene in `env` (a ControlEnv / OffScreenRenderEnv wrapper, or the robosuite env)."""
    inner = getattr(env, "env", env)
    static = _static(inner)
    sim = inner.sim
    data = sim.data

    scene = dict(static["public"])
    bodies = static["entity_body"]
    scene["pos"] = np.array(data.body_xpos[bodies], dtype=np.float64)
    scene["mat"] = np.array(data.body_xmat[bodies], dtype=np.float64).reshape(-1, 3, 3)

    g = static["geom_ids"]
    mats = np.array(data.geom_xmat[g], dtype=np.float64).reshape(-1, 3, 3)
    # mesh geoms' bounding boxes need not be centred on the geom frame: shift by the rotated local offset
    scene["geom_pos"] = np.array(data.geom_xpos[g], dtype=np.float64) + np.einsum("nij,nj->ni", mats,
                                                                                  static["geom_offset"])
    scene["geom_mat"] = mats

    sites = {}
    for name, (sid, size, parent) in static["sites"].items():
        sites[name] = {"pos": np.array(data.site_xpos[sid], dtype=np.float64),
                       "mat": np.array(data.site_xmat[sid], dtype=np.float64).reshape(3, 3),
                       "half": size, "parent": parent}
    scene["sites"] = sites

    scene["joints"] = {name: [float(data.qpos[a]) for a in addrs] for name, addrs in static["joint_addrs"].items()}
    # articulations (drawers, doors, knobs): where each joint is and which way it moves, in the world frame
    arts = {}
    for jname, (jid, addr, body, kind, owner, rng) in static["articulations"].items():
        arts[jname] = {"qpos": float(data.qpos[addr]), "axis": np.array(data.xaxis[jid], dtype=np.float64),
                       "anchor": np.array(data.xanchor[jid], dtype=np.float64), "body": body, "type": kind,
                       "owner": owner, "range": rng}
    scene["articulations"] = arts
    scene["goal_done"] = [_eval_predicate(inner, p) for p in static["public"]["goal"]]
    return scene


def _eval_predicate(inner, predicate) -> bool:
    """Truth of one goal predicate as the env's own success check computes it (False where it cannot)."""
    evaluate = getattr(inner, "_eval_predicate", None)
    if evaluate is None:
        return False
    try:
        return bool(evaluate(predicate))
    except Exception:  # a predicate the env cannot evaluate on its own must not break the episode
        return False


def _static(inner) -> dict:
    model = inner.sim.model
    cached = getattr(inner, _CACHE_ATTR, None)
    # keyed by the model object: a hard reset rebuilds the model, a soft reset keeps it
    if cached is not None and cached[0] is model and cached[1] == model.ngeom:
        return cached[2]
    static = _build_static(inner)
    setattr(inner, _CACHE_ATTR, (model, model.ngeom, static))
    return static


def _build_static(inner) -> dict:
    model = inner.sim.model
    objects = list(getattr(inner, "objects_dict", {}))
    fixtures = list(getattr(inner, "fixtures_dict", {}))
    names = objects + fixtures
    root = {int(inner.obj_body_id[n]): i for i, n in enumerate(names)}

    # the entity that owns each body: walk up the kinematic tree to the first entity root (world = -1)
    parent = np.asarray(model.body_parentid)
    owner_of_body = np.full(model.nbody, -1, dtype=np.int64)
    for b in range(model.nbody):
        a = b
        while a != 0 and a not in root:
            a = int(parent[a])
        owner_of_body[b] = root.get(a, -1)

    geom_ids, owners, halves, offsets, types = [], [], [], [], []
    aabb = getattr(model, "geom_aabb", None)
    for gid in range(model.ngeom):
        if model.geom_contype[gid] == 0 and model.geom_conaffinity[gid] == 0:
            continue  # visual-only geom: it cannot be collided with
        o = owner_of_body[model.geom_bodyid[gid]]
        t = int(model.geom_type[gid])
        if o < 0 or t in (_PLANE, _HFIELD):
            continue
        half, off = _local_box(model, gid, t, aabb)
        geom_ids.append(gid)
        owners.append(o)
        halves.append(half)
        offsets.append(off)
        types.append(t)

    sites = {}
    for name, site in getattr(inner, "object_sites_dict", {}).items():
        try:
            sid = model.site_name2id(name)
        except Exception:
            continue
        size = getattr(site, "size", None)
        size = np.asarray(model.site_size[sid] if size is None else size, dtype=np.float64).reshape(-1)
        size = np.resize(size, 3)
        sites[name] = (sid, size, getattr(site, "parent_name", None))

    articulations, site_joints = {}, {}
    for name in fixtures + objects:
        for j in [j for j in (getattr(inner.get_object(name), "joints", None) or []) if isinstance(j, str)]:
            try:
                jid = model.joint_name2id(j)
            except Exception:
                continue
            if model.jnt_type[jid] in (2, 3):  # slide or hinge
                articulations[j] = (jid, int(model.jnt_qposadr[jid]), int(model.jnt_bodyid[jid]),
                                    "slide" if model.jnt_type[jid] == 2 else "hinge", name,
                                    np.array(model.jnt_range[jid], dtype=np.float64))
    for name, site in getattr(inner, "object_sites_dict", {}).items():
        js = [j for j in (getattr(site, "joints", None) or []) if isinstance(j, str) and j in articulations]
        if js:
            site_joints[name] = js
    ranges = {}
    for name in fixtures + objects:
        props = getattr(inner.get_object(name), "object_properties", {}) or {}
        art = props.get("articulation", {}) if isinstance(props, dict) else {}
        r = {k: [float(x) for x in v] for k, v in art.items() if k.endswith("_ranges")}
        if r:
            ranges[name] = r

    joint_addrs = {}
    for name in fixtures + objects:
        obj = inner.get_object(name)
        joints = [j for j in (getattr(obj, "joints", None) or []) if isinstance(j, str)]
        addrs = []
        for j in joints:
            try:
                if model.jnt_type[model.joint_name2id(j)] in (2, 3):  # slide or hinge: one scalar
                    addrs.append(int(model.get_joint_qpos_addr(j)))
            except Exception:
                continue
        if addrs:
            joint_addrs[name] = addrs

    base = None
    for body in ("robot0_base", "robot0_link0"):
        try:
            base = np.array(inner.sim.data.body_xpos[model.body_name2id(body)], dtype=np.float64)
            break
        except Exception:
            continue

    public = {
        "goal": [[str(x).lower() for x in p] for p in inner.parsed_problem["goal_state"]],
        "names": names,
        "is_fixture": np.array([n in fixtures for n in names], dtype=bool),
        "classes": [type(inner.get_object(n)).__name__ for n in names],
        "geom_owner": np.asarray(owners, dtype=np.int64),
        "geom_half": np.asarray(halves, dtype=np.float64).reshape(-1, 3),
        "geom_type": np.asarray(types, dtype=np.int64),
        "robot_base": base,
        "geom_body": np.asarray(model.geom_bodyid[np.asarray(geom_ids, dtype=np.int64)], dtype=np.int64),
        "site_joints": site_joints,
        "articulation_ranges": ranges,  # e.g. {"wooden_cabinet_1": {"default_open_ranges": [-0.16, -0.14]}}
    }
    return {"public": public, "entity_body": np.array([inner.obj_body_id[n] for n in names], dtype=np.int64),
            "geom_ids": np.asarray(geom_ids, dtype=np.int64),
            "geom_offset": np.asarray(offsets, dtype=np.float64).reshape(-1, 3),
            "sites": sites, "joint_addrs": joint_addrs, "articulations": articulations}


def _local_box(model, gid, t, aabb):
    """Half extents and centre offset of a geom's bounding box in its own frame."""
    s = np.asarray(model.geom_size[gid], dtype=np.float64)
    if t == _BOX or t == _ELLIPSOID:
        return s[:3].copy(), np.zeros(3)
    if t == _SPHERE:
        return np.full(3, s[0]), np.zeros(3)
    if t == _CAPSULE:
        return np.array([s[0], s[0], s[1] + s[0]]), np.zeros(3)
    if t == _CYLINDER:
        return np.array([s[0], s[0], s[1]]), np.zeros(3)
    if aabb is not None:  # meshes: MuJoCo's own local bounding box (centre, half extents)
        box = np.asarray(aabb[gid], dtype=np.float64).reshape(-1)
        if box.size == 6 and np.all(box[3:] > 0):
            return box[3:].copy(), box[:3].copy()
    r = float(model.geom_rbound[gid])
    return np.full(3, r), np.zeros(3)
