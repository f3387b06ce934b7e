"""Invented facts for teaching and testing a read (chapter 4, "Positive control").

A read adapter can only learn to read if what it is asked cannot be answered any other way. The
facts here are generated, never repeat, and are only ever stated once, in one conversation:

- :func:`invented_facts` writes them into LoCoMo conversations as extra turns (the chapter's
  positive control on real conversations);
- :func:`fact_curriculum` builds many short synthetic conversations of filler turns (taken from
  real training conversations) and a few facts each: thousands of facts to learn reading from.

A fact is "<speaker>: By the way, my <thing> is called <name>." and its question "What is
<speaker>'s <thing> called?". Speaker, things and names are drawn at random for every
conversation, so the model cannot memorise which name goes with which thing, and another
conversation's bank holds other facts (the draws are independent, so a fact recurs by chance,
about once in 24 x 16 x 66 draws).
"""

from __future__ import annotations

import numpy as np

from ..data import Conversation

THINGS = ("pet lizard", "pet parrot", "sailboat", "old bicycle", "houseplant", "robot vacuum", "hamster",
          "guitar", "goldfish", "motorbike", "tortoise", "kite", "pet rabbit", "camper van", "bonsai tree",
          "sourdough starter")
# short names a pet or a boat gets; which one a thing is called is drawn at random
NAMES = ("Pepper", "Luna", "Max", "Oscar", "Ruby", "Jasper", "Willow", "Ziggy", "Mabel", "Rocket", "Biscuit",
         "Clover", "Hazel", "Otis", "Pickle", "Maple", "Scout", "Juniper", "Felix", "Nova", "Poppy", "Bruno",
         "Olive", "Comet", "Basil", "Daisy", "Gizmo", "Marble", "Ginger", "Pixel", "Mango", "Tango", "Echo",
         "Atlas", "Bear", "Cedar", "Dash", "Ember", "Fig", "Goose", "Honey", "Iris", "Jelly", "Kiwi",
         "Lemon", "Mocha", "Nugget", "Oreo", "Peanut", "Quincy", "Rosie", "Sage", "Taco", "Sunny", "Velvet",
         "Waffle", "Yoshi", "Zelda", "Apollo", "Bingo", "Coco", "Dottie", "Elvis", "Fudge", "Gus", "Harley")
SPEAKERS = ("Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Isla", "Jonas", "Kemi", "Liam",
            "Maya", "Noah", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Victor", "Wen", "Yusuf")


def _fact(speaker: str, thing: str, name: str) -> tuple[str, str]:
    return f"{speaker}: By the way, my {thing} is called {name}.", f"What is {speaker}'s {thing} called?"


def fact_curriculum(n_conversations: int, filler: list[str], *, facts_per_conversation: int = 2,
                    filler_turns: int = 8, n_names: int | None = None, seed: int = 0,
                    prefix: str = "facts") -> tuple[dict, list[dict]]:
    """Synthetic conversations of filler turns and invented facts, with one question per fact (chapter 4).

    Each conversation has ``filler_turns`` turns drawn from ``filler`` (real training turns) and
    ``facts_per_conversation`` facts about different things of one speaker, at random places; its
    questions are asked after the whole conversation. ``n_names``: draw names from the first
    ``n_names`` of :data:`NAMES` only (a probe's classes). Returns the conversations by id and the
    questions (``asked_at`` set, ``category`` 0, ``lag_kind`` "curriculum").
    """
    rng = np.random.default_rng(seed)
    names = NAMES[:n_names] if n_names else NAMES
    n_things = min(facts_per_conversation, len(THINGS))
    convs, questions = {}, []
    for c in range(n_conversations):
        sid = f"{prefix}-{c}"
        speaker = str(rng.choice(SPEAKERS))
        things = rng.choice(len(THINGS), size=n_things, replace=False)
        turns = [filler[int(i)] for i in rng.choice(len(filler), size=filler_turns, replace=False)]
        places = sorted(rng.choice(filler_turns + n_things, size=n_things, replace=False).tolist())
        facts = []
        for place, thing in zip(places, things):
            name = str(rng.choice(names))
            turn, question = _fact(speaker, THINGS[int(thing)], name)
            turns.insert(place, turn)
            facts.append((place, question, name))
        convs[sid] = Conversation(sid, turns, [1] * len(turns))
        questions += [{"question": question, "answer": name, "category": 0, "evidence": [place],
                       "missing_evidence": 0, "sample_id": sid, "asked_at": len(turns), "lag_kind": "curriculum"}
                      for place, question, name in facts]
    return convs, questions
