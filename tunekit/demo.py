"""The demo task: turn a short free-text order note into one strict JSON object.

A 135M instruct model, told the schema, still answers in prose or with the wrong keys, so its exact
match is near zero; a few hundred examples of LoRA teach it the format and the field extraction.
The generator is deterministic: the same seed writes byte-identical data.
"""

from __future__ import annotations

import json
import random

SYSTEM_PROMPT = (
    "Extract the order from the note. Answer with one JSON object and nothing else, with keys "
    '"customer" (full name), "item" (singular, lower case), "quantity" (integer) and "city".'
)

FIRST_NAMES = ["Maria", "John", "Aisha", "Wei", "Lukas", "Sofia", "Omar", "Priya", "Diego", "Hannah", "Kenji", "Fatima",
               "Noah", "Elena", "Tomas", "Grace", "Ivan", "Chloe", "Mateo", "Amara", "Lars", "Nadia", "Samuel", "Yuki"]
LAST_NAMES = ["Lopez", "Smith", "Khan", "Chen", "Weber", "Rossi", "Haddad", "Patel", "Garcia", "Muller", "Tanaka",
              "Okafor", "Novak", "Silva", "Berg", "Kowalski", "Nguyen", "Dubois", "Ivanova", "Murphy", "Santos", "Kim"]
CITIES = ["Denver", "Lyon", "Osaka", "Nairobi", "Porto", "Austin", "Krakow", "Leeds", "Toronto", "Bergen", "Seville",
          "Melbourne", "Chennai", "Quito", "Tallinn", "Boston", "Dublin", "Graz", "Busan", "Accra", "Utrecht", "Cusco"]
ITEMS = ["desk lamp", "water bottle", "notebook", "office chair", "coffee grinder", "bike helmet", "yoga mat",
         "phone charger", "backpack", "tea kettle", "wall clock", "keyboard", "frying pan", "umbrella", "table fan",
         "laptop stand", "picture frame", "garden hose", "rain jacket", "cutting board", "flower pot", "headphone set"]
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine",
                10: "ten", 12: "twelve"}

# Phrasings vary word order, number style and plural forms so the model must extract, not copy a layout.
NOTES = [
    "{name} from {city} ordered {qty} {items}.",
    "New order: {qty} x {item}, customer {name}, ship to {city}.",
    "Please send {qty} {items} to {name} in {city}.",
    "{city} branch: {name} wants {qty} {items} asap",
    "Customer {name} ({city}) placed an order for {qty} {items}.",
    "ship {qty} {items} -> {city}, attn {name}",
    "Hi, this is {name}. Could I get {qty} {items} delivered to {city}? Thanks!",
    "Order note - item: {item}; qty: {qty}; buyer: {name}; destination: {city}",
]


def _plural(item: str, qty: int) -> str:
    return item if qty == 1 else item + ("es" if item.endswith(("sh", "ch", "s")) else "s")


def make_record(rng: random.Random) -> dict:
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    city, item = rng.choice(CITIES), rng.choice(ITEMS)
    qty = rng.choice([1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 40])
    spoken = NUMBER_WORDS[qty] if qty in NUMBER_WORDS and rng.random() < 0.3 else str(qty)
    note = rng.choice(NOTES).format(name=name, city=city, qty=spoken, item=item, items=_plural(item, qty))
    answer = json.dumps({"customer": name, "item": item, "quantity": qty, "city": city})
    return {"messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": note},
        {"role": "assistant", "content": answer},
    ]}


def generate(records: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [make_record(rng) for _ in range(records)]


# ---------------------------------------------------------------- domain corpus (raw text for the dapt stage)

# Prose of the demo task's domain (order notes, shipping updates, customer service), written as
# documents: what a shop's ticket system or mail archive holds, not question/answer pairs.
DOMAIN_OPENINGS = [
    "Order note for {name} in {city}: {qty} {items}.",
    "Ticket from {name} ({city}) about an order of {qty} {items}.",
    "Shipping update: {qty} {items} for {name} left the warehouse for {city} this morning.",
    "Dear {name}, thank you for ordering {qty} {items} from our shop.",
    "Internal note: {name} called from {city} to ask about {qty} {items}.",
    "Return request: {name} in {city} wants to send back {qty} {items}.",
]
DOMAIN_MIDDLES = [
    "The parcel is packed in two boxes and the courier collects it before noon.",
    "Payment was confirmed by card, so the order moved straight to picking.",
    "Deliveries to {city} usually take two to three working days.",
    "The customer asked for the {item} to be gift wrapped and a note added.",
    "One {item} was out of stock, so the order ships in two parts.",
    "The tracking number was sent by email together with the invoice.",
    "Our {city} partner confirmed the address and the delivery window.",
    "The customer prefers delivery after five in the evening on weekdays.",
    "A discount code was applied because the last delivery arrived late.",
    "Quality control checked every {item} before it was sealed.",
]
DOMAIN_CLOSINGS = [
    "Please reply to this message if anything about the order is wrong.",
    "Status: shipped. No further action needed.",
    "Status: waiting for the courier. Check again tomorrow.",
    "Kind regards, the customer service team.",
    "Refund approved; the amount reaches the card within five days.",
    "Next step: call {name} once the parcel reaches {city}.",
]


def make_domain_document(rng: random.Random) -> str:
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    city, item = rng.choice(CITIES), rng.choice(ITEMS)
    qty = rng.choice([1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 40])
    fields = {"name": name, "city": city, "item": item, "qty": qty, "items": _plural(item, qty)}
    sentences = [rng.choice(DOMAIN_OPENINGS), *rng.sample(DOMAIN_MIDDLES, rng.randint(1, 3)), rng.choice(DOMAIN_CLOSINGS)]
    return " ".join(sentence.format(**fields) for sentence in sentences)


def generate_domain(documents: int, seed: int) -> list[str]:
    """Deterministic domain documents; the seed is offset so they do not mirror the chat records."""
    rng = random.Random(seed + 1_000_003)
    return [make_domain_document(rng) for _ in range(documents)]
