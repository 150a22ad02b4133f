"""Write tests/data/corpus.txt: a deterministic, learnable ~150 KB text corpus.

Stdlib only. A small probabilistic grammar of English sentences (a modest
vocabulary, agreement, dialogue), short rhyming poems, and Chinese sentences so
that multi-byte UTF-8 is covered. Structured, not random soup: a small
recurrent net learns it well below the unigram entropy.

    python tests/data/make_corpus.py            # writes corpus.txt next to this file
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

TARGET_BYTES = 150_000
SEED = 20261127

NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack"]
ANIMALS = ["cat", "dog", "bird", "fox", "horse", "rabbit", "owl", "mouse"]
THINGS = ["book", "lamp", "boat", "letter", "garden", "window", "river", "bridge", "apple", "song"]
PLACES = ["the market", "the old house", "the forest", "the harbour", "the school", "the hill", "the station"]
ADJS = ["small", "quiet", "bright", "old", "red", "cold", "happy", "tired", "green", "brave"]
ADVS = ["slowly", "quickly", "softly", "carefully", "happily", "again"]
TIMES = ["in the morning", "at night", "after the rain", "every day", "on Sunday", "before dinner"]
VERBS_T = [("sees", "saw"), ("finds", "found"), ("carries", "carried"), ("likes", "liked"),
           ("paints", "painted"), ("opens", "opened"), ("follows", "followed")]
VERBS_I = [("walks", "walked"), ("sleeps", "slept"), ("sings", "sang"), ("waits", "waited"),
           ("runs", "ran"), ("smiles", "smiled")]
PREPS = ["near", "under", "behind", "beside", "across", "inside"]

RHYMES = [("night", "light"), ("day", "way"), ("sea", "free"), ("rain", "again"),
          ("hill", "still"), ("sky", "fly"), ("tree", "me"), ("home", "roam")]
POEM_LINES = [
    "The {adj} {animal} walks into the {a}",
    "and every {thing} is {adj} and {b}",
    "I remember the {thing} by the {a}",
    "we sing until the {adj} {b}",
    "the wind is {adj} above the {a}",
    "and slowly we come {b}",
]

ZH_PEOPLE = ["小明", "小红", "老师", "妈妈", "爸爸", "我的朋友", "他", "她", "我们"]
ZH_PLACES = ["公园里", "学校里", "家里", "河边", "山上", "图书馆里", "市场上"]
ZH_ACTIONS = ["看书", "唱歌", "喝茶", "写信", "散步", "吃苹果", "画画", "休息"]
ZH_TIMES = ["今天", "昨天", "早上", "晚上", "下雨的时候", "每个星期天"]
ZH_FEEL = ["很高兴", "有点累", "很安静", "非常开心", "不太忙"]


def noun_phrase(rng: random.Random) -> str:
    """'the (adj) animal/thing' or a name."""
    if rng.random() < 0.3:
        return rng.choice(NAMES)
    noun = rng.choice(ANIMALS + THINGS)
    adj = rng.choice(ADJS) + " " if rng.random() < 0.5 else ""
    return f"the {adj}{noun}"


def subject(rng: random.Random) -> str:
    """A sentence subject: a name or an animal (things do not act)."""
    if rng.random() < 0.5:
        return rng.choice(NAMES)
    adj = rng.choice(ADJS) + " " if rng.random() < 0.5 else ""
    return f"the {adj}{rng.choice(ANIMALS)}"


def clause(rng: random.Random) -> str:
    """One clause from the grammar, present or past tense, not capitalized."""
    past = rng.random() < 0.5
    subj = subject(rng)
    if rng.random() < 0.6:
        verb = rng.choice(VERBS_T)[past]
        core = f"{subj} {verb} {noun_phrase(rng)}"
    else:
        verb = rng.choice(VERBS_I)[past]
        core = f"{subj} {verb} {rng.choice(ADVS)}"
    r = rng.random()
    if r < 0.3:
        core += f" {rng.choice(PREPS)} {rng.choice(PLACES)}"
    elif r < 0.45:
        core += f" because {clause(rng)}"
    if rng.random() < 0.25:
        core = f"{rng.choice(TIMES)}, {core}"
    return core


def sentence(rng: random.Random) -> str:
    """One English sentence: a capitalized clause and a full stop."""
    core = clause(rng)
    return core[0].upper() + core[1:] + "."


def paragraph(rng: random.Random) -> str:
    """A few grammar sentences."""
    return " ".join(sentence(rng) for _ in range(rng.randint(3, 6)))


def dialogue(rng: random.Random) -> str:
    """A short exchange between two named speakers."""
    a, b = rng.sample(NAMES, 2)
    thing, place = rng.choice(THINGS), rng.choice(PLACES)
    lines = [
        f'"Where is the {thing}?" asked {a}.',
        f'"It is {rng.choice(PREPS)} {place}," said {b}.',
    ]
    if rng.random() < 0.6:
        lines.append(f'"Thank you, {b}. I will go to {place} {rng.choice(ADVS)}."')
    else:
        lines.append(f'"No, {b}, I looked there. The {thing} is not there."')
    return "\n".join(lines)


def poem(rng: random.Random) -> str:
    """A rhyming quatrain with a title."""
    (a1, b1), (a2, b2) = rng.sample(RHYMES, 2)
    fill = {"adj": rng.choice(ADJS), "animal": rng.choice(ANIMALS), "thing": rng.choice(THINGS)}
    lines = rng.sample(POEM_LINES, 4)
    ends = [a1, a2, b1, b2]
    body = [line.format(a=end, b=end, **fill) for line, end in zip(lines, ends, strict=True)]
    body[0] = body[0][0].upper() + body[0][1:]
    title = f"{fill['adj'].capitalize()} {fill['thing'].capitalize()}"
    return title + "\n\n" + ",\n".join(body) + "."


def chinese(rng: random.Random) -> str:
    """A few simple Chinese sentences."""
    out = []
    for _ in range(rng.randint(2, 4)):
        who = rng.choice(ZH_PEOPLE)
        if rng.random() < 0.7:
            out.append(f"{rng.choice(ZH_TIMES)}{who}在{rng.choice(ZH_PLACES)}{rng.choice(ZH_ACTIONS)}。")
        else:
            out.append(f"{who}{rng.choice(ZH_FEEL)}，因为{rng.choice(ZH_PEOPLE)}在{rng.choice(ZH_ACTIONS)}。")
    return "".join(out)


def build(target_bytes: int = TARGET_BYTES, seed: int = SEED) -> str:
    """The corpus text: sections until it reaches target_bytes of UTF-8."""
    rng = random.Random(seed)
    kinds = [(paragraph, 0.5), (dialogue, 0.2), (poem, 0.1), (chinese, 0.2)]
    parts: list[str] = []
    size = 0
    while size < target_bytes:
        make = rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
        part = make(rng) + "\n\n"
        parts.append(part)
        size += len(part.encode("utf-8"))
    return "".join(parts)


def main(argv: list[str]) -> None:
    """Write the corpus to argv[1] or to corpus.txt beside this script."""
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).with_name("corpus.txt")
    out.write_text(build(), encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv)
