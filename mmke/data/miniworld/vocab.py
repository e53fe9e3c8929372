"""The closed vocabulary of the mini world: shapes, colours, places, sizes and question templates.

Every template listed here is seen in pretraining with true answers, so a text rephrase is a
paraphrase the backbone already understands; an edit must carry over to it (T-Gen).
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
COLUMNS: tuple[str, ...] = ("left", "middle", "right")
SIZES: tuple[str, ...] = ("small", "big")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three")
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((245, 245, 245), (225, 225, 215), (210, 220, 230))

# Question templates per type; the first is the edit question ``src``, the rest are rephrases.
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the {shape}?", "Which colour does the {shape} have?",
               "What is the colour of the {shape}?"),
    "shape": ("What shape is the {colour} object?", "Which shape is coloured {colour}?",
              "What kind of shape is the {colour} one?"),
    "position": ("Where is the {shape}?", "On which side is the {shape}?",
                 "In what part of the picture is the {shape}?"),
    "size": ("How big is the {shape}?", "What size is the {shape}?", "Is the {shape} small or big?"),
    "count": ("How many objects are there?", "What is the number of objects in the picture?",
              "Count the objects in the image."),
    "existence": ("Is there a {shape}?", "Does the picture contain a {shape}?",
                  "Can you see a {shape} in the image?"),
}

# Caption prompts (E-IC): the first is ``src`` as in MMEdit ("a photo of"), the rest rephrases.
CAPTION_PROMPTS: tuple[str, ...] = ("a photo of", "an image of", "a picture showing")

# Text-locality facts in the NQ style MMEdit uses ("nq question: ...").
FACT_TEMPLATES: dict[str, str] = {
    "capital": "nq question: what is the capital of {subject}",
    "river": "nq question: which river flows through {subject}",
}
SYLLABLES: tuple[str, ...] = ("ka", "lo", "mi", "ra", "ven", "tor", "sa", "bel", "dun", "fi",
                              "gor", "hal", "is", "jun", "mar", "nor", "pel", "quo", "sel", "tam")
