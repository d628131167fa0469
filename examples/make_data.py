"""Write the demo's two small classification tasks into examples/data/ (deterministic).

- sentiment: is a short review positive or negative?  {"text": ..., "label": "positive"|"negative"}
- topic: is a sentence about sport or science?          {"text": ..., "label": "sport"|"science"}

Sentences are built from templates and word lists with a fixed seed, so the files are the same on
every machine; 400 training and 200 evaluation records per task, the evaluation sentences using
subjects the training ones never use.

    python examples/make_data.py [--out examples/data]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SENTIMENT = {
    "positive": ["wonderful", "delightful", "excellent", "moving", "brilliant", "charming", "superb", "gripping",
                 "beautiful", "funny", "heartfelt", "clever"],
    "negative": ["dreadful", "boring", "awful", "clumsy", "tedious", "shallow", "painful", "forgettable",
                 "ugly", "lifeless", "predictable", "annoying"],
}
SENTIMENT_TEMPLATES = ["The {thing} was {word}.", "I found the {thing} {word} from start to finish.",
                       "What a {word} {thing}.", "Honestly, a {word} {thing}.", "The {thing} felt {word} to me."]
THINGS_TRAIN = ["film", "movie", "book", "novel", "play", "album", "show", "series"]
THINGS_EVAL = ["concert", "musical", "documentary", "comic", "podcast"]

TOPIC = {
    "sport": ["scored a late goal", "won the championship final", "ran a personal best in the marathon",
              "was sent off after a foul", "signed for a new club", "served an ace to take the set",
              "finished third in the grand prix", "kicked the winning penalty"],
    "science": ["published a study on cell division", "measured the speed of the reaction",
                "observed a new exoplanet", "sequenced the genome of the bacterium", "ran the experiment again",
                "found evidence of dark matter", "calibrated the telescope", "modelled the climate data"],
}
TOPIC_TEMPLATES = ["The {who} {what}.", "Yesterday the {who} {what}.", "Reports say the {who} {what}.",
                   "After months of work, the {who} {what}."]
WHO_TRAIN = {"sport": ["striker", "captain", "runner", "team", "player"],
             "science": ["researcher", "laboratory", "physicist", "biologist", "team of scientists"]}
WHO_EVAL = {"sport": ["goalkeeper", "champion", "athlete"], "science": ["chemist", "astronomer", "institute"]}


def sentiment(n: int, things: list[str], rng: random.Random) -> list[dict]:
    records = []
    for i in range(n):
        label = ("positive", "negative")[i % 2]
        text = rng.choice(SENTIMENT_TEMPLATES).format(thing=rng.choice(things), word=rng.choice(SENTIMENT[label]))
        records.append({"text": text, "label": label})
    rng.shuffle(records)
    return records


def topic(n: int, who: dict[str, list[str]], rng: random.Random) -> list[dict]:
    records = []
    for i in range(n):
        label = ("sport", "science")[i % 2]
        text = rng.choice(TOPIC_TEMPLATES).format(who=rng.choice(who[label]), what=rng.choice(TOPIC[label]))
        records.append({"text": text, "label": label})
    rng.shuffle(records)
    return records


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(20261122)
    write(args.out / "sentiment_train.jsonl", sentiment(400, THINGS_TRAIN, rng))
    write(args.out / "sentiment_eval.jsonl", sentiment(200, THINGS_EVAL, rng))
    write(args.out / "topic_train.jsonl", topic(400, WHO_TRAIN, rng))
    write(args.out / "topic_eval.jsonl", topic(200, WHO_EVAL, rng))
    print(f"wrote 4 files into {args.out}")


if __name__ == "__main__":
    main()
