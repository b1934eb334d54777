"""Helpers of the routing-analysis tests (a plain module: tests/ has no packages): two topics with
disjoint words, a tiny unit space."""

from __future__ import annotations

from aptp.core.units import UnitGroup, UnitSpace

OCEAN_NOUNS = ["sailboat", "whale", "fishing boat", "seagull", "dolphin", "lighthouse", "surfer", "crab"]
OCEAN_PLACES = ["on the stormy ocean waves", "in the harbor at sea"]
BAKING_NOUNS = ["chocolate cake", "loaf of bread", "chef", "pile of cookies", "bowl of dough", "frying pan",
                "pizza", "baker"]
BAKING_PLACES = ["in the kitchen oven", "on the flour-covered baking table"]

OCEAN = [f"a {n} {p}" for p in OCEAN_PLACES for n in OCEAN_NOUNS]  # 16 prompts
BAKING = [f"a {n} {p}" for p in BAKING_PLACES for n in BAKING_NOUNS]  # 16 prompts
OCEAN_WORDS = {"sailboat", "whale", "fishing", "boat", "seagull", "dolphin", "lighthouse", "surfer", "crab",
               "stormy", "ocean", "waves", "harbor", "sea"}
BAKING_WORDS = {"chocolate", "cake", "loaf", "bread", "chef", "pile", "cookies", "bowl", "dough", "frying", "pan",
                "pizza", "baker", "kitchen", "oven", "flour", "covered", "baking", "table"}


def interleaved() -> tuple[list[str], list[str]]:
    """The 32 prompts, topics alternating, and their topic labels."""
    prompts, topics = [], []
    for o, b in zip(OCEAN, BAKING):
        prompts += [o, b]
        topics += ["ocean", "baking"]
    return prompts, topics


def make_unit_space() -> UnitSpace:
    """One width group of 8 units (10 MACs each) in a 1000-MAC model: dropping k units keeps 1 - k/100."""
    return UnitSpace((UnitGroup("resnet_channels", "down.0.resnets.0", 8, 10.0, 5),), total_macs=1000.0,
                     total_params=1000)
