"""Write `docqa.json`: the quality suite's document-QA task set (deterministic; run to regenerate).

    python benchmarks/data/docqa/make_docqa.py

32 fictional places (hand-written below), in 8 groups of 4. Each place is one short document
(a title line and four sentences, about 45 tokens); each document is asked 4 questions in four
styles (who founded it, which city, what it is known for, how many of something): 128 questions.
Every answer is a span of its document, and the four documents of a group never share an answer,
so a model that reads the wrong document is wrong. People and places are invented (the cities are
real), so a model cannot answer from memory.
"""

from __future__ import annotations

import json
from pathlib import Path

# name, kind, city, founder, specialty, count, unit
PLACES = [
    ("Velvet Lantern", "bakery", "Oslo", "Maria Holm", "cardamom bread", 12, "ovens"),
    ("Harbor Point", "lighthouse", "Galway", "Tomas Berg", "red granite tower", 3, "lamps"),
    ("Amber Line", "tram company", "Lisbon", "Rui Costa", "yellow trams", 14, "stops"),
    ("Juniper Hall", "concert hall", "Leipzig", "Clara Vogt", "wooden organ", 900, "seats"),
    ("Copper Kettle", "tea house", "Kyoto", "Aiko Tanaka", "smoked green tea", 6, "rooms"),
    ("Silver Fern", "rowing club", "Auckland", "Hemi Walker", "night races", 40, "boats"),
    ("Blue Heron", "bookshop", "Montreal", "Louis Gagnon", "old maps", 5, "floors"),
    ("Stone Bridge", "brewery", "Prague", "Jan Novak", "dark lager", 8, "tanks"),
    ("Golden Quill", "newspaper", "Dublin", "Nora Quinn", "crossword puzzles", 30, "reporters"),
    ("Iron Gate", "museum", "Warsaw", "Piotr Nowak", "clock collection", 11, "galleries"),
    ("Paper Moon", "cinema", "Madrid", "Lucia Romero", "silent films", 4, "screens"),
    ("Red Orchard", "farm", "Tasmania", "Ella Grant", "cider apples", 200, "trees"),
    ("White Cliff", "hotel", "Dover", "Arthur Bell", "sea views", 52, "beds"),
    ("Green Lantern", "theatre", "Vienna", "Franz Huber", "puppet shows", 7, "stages"),
    ("Salt Marsh", "bird reserve", "Texel", "Pieter Smit", "spoonbills", 9, "hides"),
    ("Cedar Point", "sawmill", "Vancouver", "Grace Fraser", "cedar shingles", 15, "saws"),
    ("Blue Lagoon", "spa", "Reykjavik", "Sigrid Olafsdottir", "hot springs", 10, "pools"),
    ("Night Owl", "radio station", "Chicago", "Marcus Reed", "jazz programmes", 3, "studios"),
    ("Willow Bend", "school", "Adelaide", "Helen Ward", "music lessons", 300, "pupils"),
    ("Falcon Ridge", "observatory", "Tucson", "Diego Ramos", "large telescope", 2, "domes"),
    ("Marble Arch", "bank", "Milan", "Paolo Conti", "gold vault", 25, "branches"),
    ("Tin Drum", "toy factory", "Nuremberg", "Greta Lang", "wind-up robots", 60, "workers"),
    ("Olive Grove", "restaurant", "Athens", "Eleni Pappas", "lamb stew", 18, "tables"),
    ("Snow Peak", "ski school", "Zermatt", "Urs Meier", "glacier tours", 20, "instructors"),
    ("River Mill", "textile mill", "Manchester", "Edith Clarke", "cotton cloth", 120, "looms"),
    ("Coral Bay", "diving centre", "Cairns", "Liam Carter", "reef dives", 8, "boats"),
    ("Maple Leaf", "diner", "Toronto", "Jean Tremblay", "pancakes", 16, "booths"),
    ("Sun Temple", "yoga studio", "Goa", "Priya Nair", "sunrise classes", 4, "halls"),
    ("Black Swan", "pub", "Bristol", "Owen Hughes", "folk music", 2, "bars"),
    ("Glass House", "greenhouse", "Copenhagen", "Freja Jensen", "orchids", 5, "wings"),
    ("Desert Rose", "caravan inn", "Marrakesh", "Youssef Amrani", "mint tea", 22, "rooms"),
    ("Bright Star", "planetarium", "Glasgow", "Fiona Murray", "star shows", 150, "seats"),
]
GROUP_SIZE = 4
SYSTEM = "Answer the question in a few words, using the documents."
# The union setup: the scaffold (the longest member, what modules after the union were encoded
# after) and the members prompts select instead.
UNION = {"scaffold": ("guide", "The documents below come from a printed city guide; each one describes a single "
                      "place, its history and what visitors remember it for."),
         "members": [("notes", "Notes:"), ("list", "Here is a list of places.")]}
# The parameter setup: a module whose argument names the reader; the documents after it were
# encoded with the scaffold there.
PARAMETER = {"text_before": "This guide was prepared for ", "name": "reader", "length": 8,
             "scaffold": "a visitor", "text_after": ".",
             "arguments": ["Anna", "Mr. Lee", "the class", "Dr. Ortiz", "my family", "Sam", "the team", "Ines"]}


def document(place: tuple) -> str:
    name, kind, city, founder, specialty, count, unit = place
    return (f"## {name}\n{name} is a {kind} in {city}. It was founded by {founder}. "
            f"It is known for its {specialty}. It has {count} {unit}.\n")


def questions(doc: str, place: tuple) -> list[dict]:
    name, _, city, founder, specialty, count, unit = place
    return [
        {"doc": doc, "style": "who", "question": f"Who founded {name}?", "answers": [founder]},
        {"doc": doc, "style": "where", "question": f"In which city is {name}?", "answers": [city]},
        {"doc": doc, "style": "what", "question": f"What is {name} known for?", "answers": [specialty]},
        {"doc": doc, "style": "how_many", "question": f"How many {unit} does {name} have?", "answers": [str(count)]},
    ]


def task_set() -> dict:
    groups = []
    for g in range(len(PLACES) // GROUP_SIZE):
        places = PLACES[g * GROUP_SIZE:(g + 1) * GROUP_SIZE]
        docs = [{"name": f"d{i}", "title": p[0], "text": document(p)} for i, p in enumerate(places)]
        qs = [q for d, p in zip(docs, places) for q in questions(d["name"], p)]
        for i, q in enumerate(qs):
            q["id"] = f"g{g}-q{i}"
        groups.append({"id": f"g{g}", "documents": docs, "questions": qs})
    return {"name": "docqa", "system": SYSTEM, "union": UNION, "parameter": PARAMETER, "groups": groups}


if __name__ == "__main__":
    out = Path(__file__).with_name("docqa.json")
    out.write_text(json.dumps(task_set(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")
