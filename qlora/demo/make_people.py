"""Write the demo dataset: pull a person's name, age and city out of a sentence as JSON.

A small chat model asked this answers in prose ("Sure! Here is..."), so its exact match starts
near zero; a short LoRA fine-tune teaches it the task and the format, and the held-out exact match
shows it. Names, cities and sentence patterns are split between train and eval, so the eval set
measures the skill, not memory.

    python -m qlora.demo.make_people        # rewrites qlora/demo/people_{train,eval}.jsonl
"""
from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = """Maria Kenji Aisha Lukas Sofia Omar Elena Tariq Ingrid Mateo Yuki Fatima Pavel Chloe Ravi
Amara Jonas Leila Diego Hana Samuel Noor Viktor Zara Emil Priya Tomas Mei Hugo Adaeze Felix Irina
Kofi Lena Andre Sana Bruno Ayla Nikolai Rosa Idris Freya Marco Keiko Dmitri Nadia Pablo Astrid
Tunde Clara Hamza Greta Rafael Suki Oskar Amina Luca Elif Joao Hira Anton Maya Kwame Vera Sergio
Aiko Malik Ida Carlos Rina Stefan Lina Arjun Olga Tobias Esra Mikael Ana Jamal Sakura Henrik Dalia
Ivan Nour Pedro Mina Karl Selin Yusuf Lotte Ines Chidi Alma Boris Yara Matteo Eva Kenta Zainab""".split()
CITIES = """Lisbon Osaka Nairobi Berlin Lima Cairo Oslo Toronto Madrid Seoul Dublin Hanoi Quito Prague
Accra Vienna Austin Porto Kyoto Lagos Munich Denver Athens Bogota Zurich Manila Chicago Hamburg
Sydney Krakow Istanbul Montreal Lyon Nagoya Dakar Seattle Helsinki Valencia Boston Geneva Jakarta
Milan Phoenix Tallinn Riga Santiago Havana Perth Marseille Rotterdam Kampala Busan Glasgow Tunis
Calgary Seville Bergen Antwerp Leeds Mumbai""".split()
TRAIN_PATTERNS = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "{name} ({age}) moved to {city} last spring.",
    "At {age}, {name} opened a small bakery in {city}.",
    "Our new colleague {name} is {age} and works from {city}.",
    "{name}, aged {age}, was born and raised in {city}.",
    "Yesterday {name} turned {age} at a party in {city}.",
    "The winner, {name} of {city}, is {age} years old.",
    "{city} is home to {name}, who is {age}.",
    "{name} has lived in {city} since she was a child and is now {age}.",
    "A {age}-year-old named {name} teaches music in {city}.",
    "Reporting from {city}: {name}, {age}, finished the marathon first.",
]
EVAL_PATTERNS = [
    "{name} is a {age}-year-old engineer based in {city}.",
    "Last year {name} ({age}) relocated to {city} for work.",
    "In {city}, {name} celebrated turning {age}.",
    "{name}, who is {age}, runs a bookshop in {city}.",
]
INSTRUCTIONS = [
    "Extract the person's name, age and city as JSON.",
    "Give me name, age and city from this sentence as JSON.",
    "Return JSON with the keys name, age and city.",
]


def answer(name: str, age: int, city: str) -> str:
    return json.dumps({"name": name, "age": age, "city": city})


def make(n: int, names, cities, patterns, rng: random.Random):
    rows = []
    for _ in range(n):
        name, city, age = rng.choice(names), rng.choice(cities), rng.randint(18, 90)
        sentence = rng.choice(patterns).format(name=name, age=age, city=city)
        instruction = rng.choice(INSTRUCTIONS)
        rows.append({"messages": [
            {"role": "user", "content": f"{instruction}\n{sentence}"},
            {"role": "assistant", "content": answer(name, age, city)},
        ]})
    return rows


def main(out_dir: Path = Path(__file__).parent, n_train: int = 480, n_eval: int = 100, seed: int = 0) -> None:
    rng = random.Random(seed)
    names, cities = NAMES[:], CITIES[:]
    rng.shuffle(names)
    rng.shuffle(cities)
    # held-out names and cities: the eval set cannot be solved by memorising the training rows
    k_names, k_cities = len(names) * 4 // 5, len(cities) * 4 // 5
    train = make(n_train, names[:k_names], cities[:k_cities], TRAIN_PATTERNS, rng)
    evals = make(n_eval, names[k_names:], cities[k_cities:], EVAL_PATTERNS, rng)
    for split, rows in (("train", train), ("eval", evals)):
        path = out_dir / f"people_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
