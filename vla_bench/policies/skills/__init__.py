"""Skills of the scripted expert beyond pick-and-place and knobs (policies/expert_phases.py), one module each.

A skill is a small state machine with `step(obs, view) -> action or None` (None: done) and a `phase` string; the
expert's plan (scripted.plan_tasks) asks `skills_for(predicate, view, episode)` for the skills of each goal predicate
that the built-in phase machines do not handle.
"""
from __future__ import annotations


def skills_for(pred, view, episode) -> list:
    """The skills that achieve one BDDL goal predicate (lower case), or [] when none knows how."""
    from .door import door_skill
    from .drawer import drawer_skill

    skill = drawer_skill(pred, view, episode) or door_skill(pred, view, episode)
    return [skill] if skill is not None else []


def instead_of_pick(pred, view, episode) -> list:
    """Skills that achieve On/In(X, Y) better than picking X up and putting it down from above (pushing a plate;
    into a microwave, under its roof), or []."""
    from .enclosure import into_enclosure
    from .push import push_skill

    push = push_skill(pred, view, episode)
    return [push] if push is not None else (into_enclosure(pred, view, episode) or [])


def prerequisites(pred, view, episode) -> list:
    """Skills that must run before pick-and-place can achieve `pred`: In(X, a drawer's region) needs the drawer open
    (LIBERO-Goal's "open the top drawer and put the bowl inside" states only the In)."""
    from .drawer import drawer_skill, out_from_under

    if len(pred) == 3 and pred[0] == "in" and pred[2] in view.s["site_joints"]:
        skill = drawer_skill(["open", pred[2]], view, episode)
        if skill is not None and not skill.reached(view):
            # what would end up under the opened drawer is moved aside first: neither the hand nor the lift can get
            # at it there (LIBERO-Goal task4: the top drawer opens over the bowl)
            return out_from_under(pred[1], skill, view, episode) + [skill]
    return []


def place_offset(dest: str, view):
    """A shift (world xy, m) of where pick-and-place puts an object In `dest`: towards the open side of a drawer,
    whose region site is the centre of the whole drawer, though only its front part is out of the cabinet (a bowl
    placed at the centre rests against the face above and jams the drawer when it is pushed closed)."""
    from .drawer import drawer_opening

    d_open = drawer_opening(dest, view)
    return None if d_open is None else d_open[:2] * DRAWER_FRONT_BIAS


DRAWER_FRONT_BIAS = 0.02  # m: the bowl's rim then clears the cabinet's face by ~2 cm and its front wall by ~1 cm


#: the order skills run in, by kind: what makes way for a drawer first, then what changes the scene's layout for the
#: rest (a drawer opened before something is put in it), what closes it last
ORDER = {"clear": 0, "open": 1, "close": 3}


def order_key(skill) -> int:
    return ORDER.get(getattr(skill, "want", None), 2)
