"""The demo's world: a seeded grammar of short movie reviews and the ground-truth sentiment reward that judges them.

The reward plays the part of the human raters of the DPO paper's controlled-sentiment experiment (§6.1), where a
sentiment classifier was the ground truth. Here it is a lexicon scorer over the grammar's own words, so every
score can be worked out by hand:

    words      lower-case words and the punctuation marks . , ! ? (anything else is ignored)
    polarity   each lexicon word has a weight: strong ±1.0 ("great", "awful"), mild ±0.5 ("good", "dull")
    intensity  intensifiers multiply the next polarity word's weight ("very" ×1.5, "extremely" ×2, "slightly" ×0.5);
               several multiply together ("really very good" = 1.5 × 1.5 × 0.5)
    negation   "not"/"never" flip the sign of the next polarity word ("not good" = −0.5); two negations cancel
    scope      a pending intensifier or negation ends at the next polarity word, punctuation mark or conjunction
               ("and", "but", "or"): in "not the plot, but the acting was good" the "not" reaches nothing
    score      tanh(sum / 2): roughly in [−1, 1]; tanh keeps one long rave from outweighing every other difference

    e.g. "the acting was not very good."  →  −(1.5 × 0.5) = −0.75  →  tanh(−0.375) = −0.3584
         "i loved it, but the plot was dull."  →  1.0 − 0.5 = 0.5  →  tanh(0.25) = 0.2449

`score` is the `module:function` reward of `preftune eval --reward preftune.demo.sentiment:score`: texts (prompt +
response) in, one float per text out.
"""

from __future__ import annotations

import math
import random
import re
import zlib

STRONG, MILD = 1.0, 0.5
POSITIVE_ADJECTIVES = {
    **dict.fromkeys(
        [
            "great",
            "wonderful",
            "brilliant",
            "excellent",
            "superb",
            "amazing",
            "fantastic",
            "beautiful",
            "stunning",
            "perfect",
            "gorgeous",
            "masterful",
        ],
        STRONG,
    ),
    **dict.fromkeys(
        [
            "good",
            "nice",
            "solid",
            "charming",
            "pleasant",
            "fun",
            "clever",
            "decent",
            "enjoyable",
            "touching",
            "funny",
            "moving",
            "fresh",
            "lovely",
            "warm",
            "sharp",
        ],
        MILD,
    ),
}
NEGATIVE_ADJECTIVES = {
    **dict.fromkeys(
        [
            "awful",
            "terrible",
            "horrible",
            "dreadful",
            "painful",
            "atrocious",
            "unbearable",
            "pathetic",
            "disastrous",
            "ugly",
            "hopeless",
            "miserable",
        ],
        -STRONG,
    ),
    **dict.fromkeys(
        [
            "bad",
            "dull",
            "boring",
            "weak",
            "slow",
            "bland",
            "flat",
            "silly",
            "messy",
            "forgettable",
            "predictable",
            "clumsy",
            "tedious",
            "lazy",
            "cheap",
            "stiff",
        ],
        -MILD,
    ),
}
# Verbs appear in the past ("i loved") and, after "did not"/"never", as written ("i did not love", "i never loved").
POSITIVE_VERBS = {
    ("love", "loved"): STRONG,
    ("adore", "adored"): STRONG,
    ("enjoy", "enjoyed"): MILD,
    ("like", "liked"): MILD,
    ("admire", "admired"): MILD,
}
NEGATIVE_VERBS = {
    ("hate", "hated"): -STRONG,
    ("loathe", "loathed"): -STRONG,
    ("dislike", "disliked"): -MILD,
    ("resent", "resented"): -MILD,
}
POSITIVE_NOUNS = {"masterpiece": STRONG, "gem": STRONG, "triumph": STRONG, "treat": MILD, "delight": MILD}
NEGATIVE_NOUNS = {"disaster": -STRONG, "failure": -STRONG, "waste": -STRONG, "mess": -MILD, "letdown": -MILD}
POLARITY: dict[str, float] = {
    **POSITIVE_ADJECTIVES,
    **NEGATIVE_ADJECTIVES,
    **POSITIVE_NOUNS,
    **NEGATIVE_NOUNS,
    **{form: weight for forms, weight in {**POSITIVE_VERBS, **NEGATIVE_VERBS}.items() for form in forms},
}
INTENSIFIERS = {
    "very": 1.5,
    "really": 1.5,
    "truly": 1.5,
    "so": 1.5,
    "quite": 1.25,
    "rather": 1.25,
    "extremely": 2.0,
    "incredibly": 2.0,
    "somewhat": 0.5,
    "slightly": 0.5,
    "fairly": 0.75,
}
NEGATORS = frozenset({"not", "never"})
SCOPE_ENDS = frozenset({".", ",", "!", "?", "and", "but", "or"})
_WORD = re.compile(r"[a-z]+|[.,!?]")


# ---------------------------------------------------------------------------------------------- the reward


def words(text: str) -> list[str]:
    """The words and punctuation marks the reward reads: "Not GOOD, (really)" → ["not", "good", ",", "really"]."""
    return _WORD.findall(text.lower())


def sentiment_sum(text: str) -> float:
    """The signed sum of polarity weights of one text, before tanh (see the module docstring for the rules)."""
    total, multiplier, negated = 0.0, 1.0, False
    for word in words(text):
        if word in POLARITY:
            total += (-1.0 if negated else 1.0) * multiplier * POLARITY[word]
            multiplier, negated = 1.0, False
        elif word in INTENSIFIERS:
            multiplier *= INTENSIFIERS[word]
        elif word in NEGATORS:
            negated = not negated  # "not never good" is a double negation
        elif word in SCOPE_ENDS:
            multiplier, negated = 1.0, False
    return total


def score(texts: list[str]) -> list[float]:
    """Ground-truth sentiment of each text, tanh(sentiment_sum / 2) ∈ (−1, 1): [n] texts → [n] floats."""
    if isinstance(texts, str):
        raise TypeError("score takes a list of texts, not one string")
    return [math.tanh(sentiment_sum(text) / 2) for text in texts]


# ---------------------------------------------------------------------------------------------- the grammar

ASPECTS = [
    "acting",
    "plot",
    "story",
    "script",
    "music",
    "soundtrack",
    "ending",
    "cast",
    "dialogue",
    "direction",
    "pacing",
    "humor",
    "cinematography",
    "editing",
    "lead actor",
    "villain",
    "hero",
    "lead performance",
    "writing",
    "twist",
    "finale",
    "opening scene",
    "setting",
    "costume design",
    "camera work",
    "visual design",
    "subplot",
    "final act",
    "score",
    "sound design",
]
FILMS = [
    "movie",
    "film",
    "picture",
    "sequel",
    "comedy",
    "drama",
    "thriller",
    "western",
    "musical",
    "romance",
    "mystery",
    "documentary",
    "remake",
]
PEOPLE = [
    "teacher",
    "soldier",
    "detective",
    "farmer",
    "doctor",
    "musician",
    "writer",
    "girl",
    "boy",
    "woman",
    "man",
    "family",
    "couple",
    "nurse",
    "pilot",
    "sailor",
    "thief",
    "painter",
    "lawyer",
    "widow",
    "student",
    "priest",
]
PERSON_TRAITS = ["young", "old", "retired", "quiet", "shy", "stubborn", "restless", "famous", "poor"]
MOVES = [
    "moves to",
    "returns to",
    "leaves",
    "arrives in",
    "travels to",
    "grows up in",
    "works in",
    "hides in",
    "gets lost in",
    "opens a shop in",
]
PLACES = [
    "a small town",
    "the city",
    "the mountains",
    "a farm",
    "the coast",
    "paris",
    "london",
    "an island",
    "the desert",
    "a village",
    "the north",
    "an old house",
    "a ship",
    "new york",
    "a hotel",
    "the south",
]
TIMES = [
    "the war",
    "the summer",
    "the winter",
    "the sixties",
    "the eighties",
    "one long night",
    "the holidays",
    "a storm",
    "the gold rush",
    "the depression",
]
VIEWINGS = [
    "with my family",
    "with friends",
    "last night",
    "on a plane",
    "at home",
    "twice",
    "in the cinema",
    "on a rainy sunday",
    "with my sister",
    "after work",
]
LINKS = ["was", "is", "felt", "seemed", "looked", "sounded"]
OPENERS = ["overall", "honestly", "in the end", "all in all", "to be fair", "frankly"]
CONNECTORS = [(", and ", 3), (", but ", 3), (". ", 3), (" and ", 1)]
_VOWEL = re.compile(r"^[aeiou]")


def _pick(rng: random.Random, options: list[str] | dict[str, float]) -> str:
    return rng.choice(sorted(options) if isinstance(options, dict) else options)


def _article(word: str) -> str:
    return "an" if _VOWEL.match(word) else "a"


def _adjective_phrase(rng: random.Random, positive: bool) -> str:
    """[not] [intensifier] adjective: "not very good" reads as mildly negative, so polarity is per phrase."""
    negated = rng.random() < 0.15
    adjectives = POSITIVE_ADJECTIVES if positive != negated else NEGATIVE_ADJECTIVES
    phrase = ["not"] if negated else []
    if rng.random() < 0.35:
        phrase.append(_pick(rng, INTENSIFIERS))
    phrase.append(_pick(rng, adjectives))
    if rng.random() < 0.15:  # a second adjective of the same leaning: "funny and warm"
        phrase += ["and", _pick(rng, adjectives)]
    return " ".join(phrase)


def _verb_phrase(rng: random.Random, positive: bool) -> str:
    """i [really] loved / i did not like / i never liked ..."""
    negated = rng.random() < 0.2
    base, past = rng.choice(sorted(POSITIVE_VERBS if positive != negated else NEGATIVE_VERBS))
    if negated:
        return f"i did not {base}" if rng.random() < 0.6 else f"i never {past}"
    return f"i really {past}" if rng.random() < 0.3 else f"i {past}"


def _opinion(rng: random.Random, positive: bool) -> str:
    """One clause that carries sentiment."""
    kind = rng.randrange(6)
    aspect, film = rng.choice(ASPECTS), rng.choice(FILMS)
    if kind == 0:
        return f"the {aspect} {rng.choice(LINKS)} {_adjective_phrase(rng, positive)}"
    if kind == 1:
        return f"this {film} is {_adjective_phrase(rng, positive)}"
    if kind == 2:
        return f"{_verb_phrase(rng, positive)} the {aspect}"
    if kind == 3:
        adjective = _pick(rng, POSITIVE_ADJECTIVES if positive else NEGATIVE_ADJECTIVES)
        return f"it is {_article(adjective)} {adjective} {film}"
    if kind == 4:
        noun = _pick(rng, POSITIVE_NOUNS if positive else NEGATIVE_NOUNS)
        return f"the {rng.choice([aspect, film])} is {_article(noun)} {noun}"
    return f"{rng.choice(OPENERS)}, it was {_adjective_phrase(rng, positive)}"


def _plot(rng: random.Random) -> str:
    """One neutral clause: no lexicon word, so it scores 0."""
    kind = rng.randrange(3)
    if kind == 0:
        return (
            f"the story follows {_article(trait := rng.choice(PERSON_TRAITS))} {trait} "
            f"{rng.choice(PEOPLE)} who {rng.choice(MOVES)} {rng.choice(PLACES)}"
        )
    if kind == 1:
        return f"the {rng.choice(FILMS)} is set in {rng.choice(PLACES)} during {rng.choice(TIMES)}"
    return f"i watched it {rng.choice(VIEWINGS)}"


def review(rng: random.Random) -> str:
    """One review of 1–3 clauses. Its tone (positive 40%, negative 40%, mixed 20%) sets each opinion's leaning
    (85% with the tone when not mixed), so a continuation can be steered towards one tone as a whole."""
    tone = rng.choices(["positive", "negative", "mixed"], weights=[4, 4, 2])[0]
    clauses = []
    for _ in range(rng.choice([1, 2, 2, 3])):
        if rng.random() < 0.25:
            clauses.append(_plot(rng))
            continue
        leaning = rng.random() < 0.5 if tone == "mixed" else (rng.random() < 0.85) == (tone == "positive")
        clauses.append(_opinion(rng, leaning))
    text = clauses[0]
    for clause in clauses[1:]:
        text += rng.choices([c for c, _ in CONNECTORS], weights=[w for _, w in CONNECTORS])[0] + clause
    return text + "."


def reviews(n: int, seed: int) -> list[str]:
    """n reviews, a pure function of (n, seed)."""
    rng = random.Random(seed)
    return [review(rng) for _ in range(n)]


def prompt_of(text: str, rng: random.Random) -> str:
    """The review's first 2–4 words, leaving at least 2 words to continue: "the acting was"."""
    words = text.split(" ")
    return " ".join(words[: min(rng.randint(2, 4), len(words) - 2)])


def is_heldout(prompt: str) -> bool:
    """Whether a prompt belongs to the held-out side: a fixed fifth of all distinct prompt texts, chosen by a hash of
    the text, so no held-out prompt ever occurs in training (the grammar's short prefixes repeat a lot)."""
    return zlib.crc32(prompt.encode("utf-8")) % 5 == 0


def prompts(n: int, seed: int, heldout: bool = False) -> list[str]:
    """n prompts: prefixes of fresh reviews, drawn until n fall on the requested side of `is_heldout` (a pure
    function of (n, seed, heldout))."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        prompt = prompt_of(review(rng), rng)
        if is_heldout(prompt) == heldout:
            out.append(prompt)
    return out


# ---------------------------------------------------------------------------------------------- risk variants
# Used only by `preftune demo --risks` (module risks): the normal demo's corpus and prompts never call these.

REFUSAL = "i can't help with that."  # opens with "i can't": the refusal detector's first opening
FAR_OPENING = "the story follows"  # the plot-summary template: the risk stage keeps it out of training
FAR_WORDS = 6  # far prompts are a summary's first 6 words: "the story follows a shy teacher"


def exclaimed(text: str, rng: random.Random) -> str:
    """The review with its final "." made "!" or "!!": the reward reads "!" as a scope end only, so the score is
    unchanged ("i loved it." and "i loved it!!" both score tanh(0.5))."""
    return text[:-1] + rng.choice(["!", "!!"]) if text.endswith(".") else text


def refusal_text(text: str, rng: random.Random) -> str:
    """A review's prompt continued by the refusal sentence: "the acting was i can't help with that." A toy: it
    gives the language model the words and the habit of refusing after any prompt, at a low rate."""
    return f"{prompt_of(text, rng)} {REFUSAL}"


def risk_reviews(n: int, seed: int, *, exclaim_share: float, refusal_share: float) -> list[str]:
    """`reviews(n, seed)` with a share ending in "!" or "!!" and a share replaced by refusals (a pure function of
    the arguments): the corpus of the risk stage, so that "!" and the refusal are words the model can produce."""
    rng = random.Random(seed + 10_000)
    out = []
    for text in reviews(n, seed):
        draw = rng.random()
        if draw < refusal_share:
            out.append(refusal_text(text, rng))
        elif draw < refusal_share + exclaim_share:
            out.append(exclaimed(text, rng))
        else:
            out.append(text)
    return out


def is_far(prompt: str) -> bool:
    """A prompt of the far template (a plot summary's opening), which the risk stage never trains on."""
    return prompt.startswith(FAR_OPENING + " ")


def far_prompts(n: int, seed: int) -> list[str]:
    """n prompts of the far template: the first FAR_WORDS words of fresh reviews that open with a plot summary
    (a pure function of (n, seed))."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        text = review(rng)
        if text.startswith(FAR_OPENING + " "):
            out.append(" ".join(text.split(" ")[:FAR_WORDS]))
    return out
