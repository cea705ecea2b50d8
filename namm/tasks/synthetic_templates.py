"""Wordings of the synthetic tasks, one per split: ``train`` follows RULER's templates, ``test``
is a held-out rewording (instruction, needle and question) that evolution never sees."""

from __future__ import annotations

TEMPLATES: dict[str, dict[str, dict[str, str]]] = {
    "passkey": {
        "train": {
            "instruction": "There is an important info hidden inside a lot of irrelevant text. Find it and "
                           "memorize it. I will quiz you about the important information there.",
            "needle": "The pass key is {key}. Remember it. {key} is the pass key.",
            "question": "What is the pass key?",
            "prefix": "The pass key is",
        },
        "test": {
            "instruction": "A single access code is buried somewhere in the long text below. Read "
                           "carefully, because you will be asked for it at the end.",
            "needle": "Note well: the access code is {key}. Keep {key} in mind as the access code.",
            "question": "Which access code was given in the text?",
            "prefix": "The access code is",
        },
    },
    **{
        name: {
            "train": {
                "instruction": "Some special magic numbers are hidden within the following text. Make sure "
                               "to memorize it. I will quiz you about the numbers afterwards.",
                "needle": "One of the special magic numbers for {key} is: {value}.",
                "question": "What are all the special magic numbers for {key} mentioned in the provided text?"
                if name == "niah_multivalue" else
                "What is the special magic number for {key} mentioned in the provided text?",
                "prefix": "The special magic numbers for {key} mentioned in the provided text are"
                if name == "niah_multivalue" else
                "The special magic number for {key} mentioned in the provided text is",
            },
            "test": {
                "instruction": "Secret codes belonging to different names are scattered through the passage "
                               "below. Remember them; questions about the codes follow the passage.",
                "needle": "Remember this: the secret code of {key} is {value}.",
                "question": "List every secret code of {key} that appears in the passage."
                if name == "niah_multivalue" else "Which secret code belongs to {key}?",
                "prefix": "The secret codes of {key} are" if name == "niah_multivalue"
                else "The secret code of {key} is",
            },
        }
        for name in ("niah_single", "niah_multikey", "niah_multivalue")
    },
    "kv_retrieval": {
        "train": {
            "instruction": "Extract the value corresponding to the specified key in the JSON object below.",
            "question": "Key: \"{key}\"",
            "prefix": "The value associated with the specified key is:",
        },
        "test": {
            "instruction": "Below is a JSON dictionary mapping identifiers to identifiers. You will be asked "
                           "to look one of them up.",
            "question": "Look up the identifier \"{key}\".",
            "prefix": "It maps to:",
        },
    },
    "variable_tracking": {
        "train": {
            "instruction": "Memorize and track the chain(s) of variable assignment hidden in the following text.",
            "needle_value": "VAR {var} = {value}.",
            "needle_copy": "VAR {var} = VAR {source}.",
            "question": "Question: Find all variables that are assigned the value {value} in the text above.",
            "prefix": "Answer: According to the chain(s) of variable assignment in the text above, {count} "
                      "variables are assigned the value {value}, they are:",
        },
        "test": {
            "instruction": "The text below hides a few assignments between variables. Follow them carefully.",
            "needle_value": "Let {var} hold {value}.",
            "needle_copy": "Let {var} hold whatever {source} holds.",
            "question": "Question: Which variables end up holding the value {value}? Name all of them.",
            "prefix": "Answer: The {count} variables holding {value} are:",
        },
    },
    "frequent_words": {
        "train": {
            "instruction": "Read the following coded text and track the frequency of each coded word. Find "
                           "the three most frequently appeared coded words.",
            "question": "Question: Do not provide any explanation. What are the three most frequently "
                        "appeared words in the above coded text?",
            "prefix": "Answer: According to the coded text above, the three most frequently appeared words are:",
        },
        "test": {
            "instruction": "Below is a long list of made-up words. Count how often each one occurs.",
            "question": "Question: Which three made-up words occur most often? Give just the words.",
            "prefix": "Answer: The three most common words are:",
        },
    },
    "multihop": {
        "train": {
            "instruction": "Read the following text. It contains a few facts about people and places; you "
                           "will have to combine two of them to answer a question.",
            "fact_home": "{person} lives in the city of {city}.",
            "fact_place": "The city of {city} is in the country of {country}.",
            "question": "Question: In which country does {person} live?",
            "prefix": "Answer: {person} lives in the country of",
        },
        "test": {
            "instruction": "Some statements about where people live are mixed into the passage below. "
                           "Connect them to answer the question at the end.",
            "fact_home": "{person} has made a home in the town of {city}.",
            "fact_place": "The town of {city} lies within the borders of {country}.",
            "question": "Question: Which country is {person}'s home in?",
            "prefix": "Answer: {person}'s home is in",
        },
    },
}
