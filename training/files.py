"""The JSON files the training commands keep between runs (splits, cache indexes, checkpoint
cards), read so that a damaged one ends a command in one line that names it."""

import json


def read_json(path: str, what: str, remedy: str):
    """A JSON file the training commands keep (a split, a cache index, a checkpoint's card); a
    damaged one ends the command in one line that names it and says what to do."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise SystemExit(f"{what} {path} is damaged ({error}): {remedy}") from None


SPLIT_PARTS = ("train", "val", "test")


def read_split(path: str) -> dict:
    """A split file: lists of case ids under train, val and test (and folds)."""
    split = read_json(path, "split file", "restore it, or delete it and run `python -m training prepare` "
                      "to draw a new split")
    missing = [part for part in SPLIT_PARTS if not isinstance(split, dict) or not isinstance(split.get(part), list)]
    if missing:
        raise SystemExit(f"split file {path} has no list of {missing[0]} cases: restore it, or delete it and run "
                         "`python -m training prepare` to draw a new split")
    return split
