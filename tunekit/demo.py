"""The demo task: turn a short free-text order note into one strict JSON object.

A 135M instruct model, told the schema, still answers in prose or with the wrong keys, so its exact
match is near zero; a few hundred examples of LoRA teach it the format and the field extraction.
The generator is deterministic: the same seed writes byte-identical data.
"""

from __future__ import annotations

import json
import random
import string

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


# ---------------------------------------------------------------- task demo data (task.type, issue 6)
# Three small data sets in the same domain for the head-based tasks. They are written to be learnable but
# not by one keyword: every class shares its vocabulary with others, entities come in several surface
# forms, and unanswerable questions look like answerable ones. The pipeline is checked on real data sets
# too, so nothing downstream may depend on these templates.

INTENTS: dict[str, list[str]] = {
    "new_order": [
        "I would like to order {qty} {items} for delivery to {city}.",
        "Could you send me {qty} {items}? The address is in {city}.",
        "Please add {qty} {items} to a new order, shipping to {city}.",
        "We need {qty} more {items} at our {city} office, same as last time.",
        "Is it possible to buy {qty} {items} and have them shipped to {city}?",
    ],
    "cancel_order": [
        "Please cancel my order of {qty} {items}, I no longer need them.",
        "I ordered {qty} {items} by mistake, can you stop the order before it ships to {city}?",
        "Don't ship the {items} to {city} after all, I want to call the order off.",
        "Could you drop the order for {qty} {items}? We found them elsewhere.",
        "I changed my mind about the {items}; please make sure the order is not sent.",
    ],
    "delivery_status": [
        "Where is my order of {qty} {items}? It should have reached {city} by now.",
        "Can you tell me when the {items} will arrive in {city}?",
        "My {qty} {items} have not shown up yet, has the parcel left the warehouse?",
        "Any update on the shipment of {items} to {city}? The tracking page shows nothing.",
        "How long until the order of {qty} {items} gets to {city}?",
        "The courier said he would return with my {items} today; when will they reach {city}?",
    ],
    "return_request": [
        "I want to send back {qty} {items}, they are not what I expected.",
        "The {items} I received in {city} don't fit my needs, how do I return them?",
        "Can I get a refund if I return the {qty} {items} from my last order?",
        "Please arrange a pickup in {city} so I can return the {items}.",
        "I would like to return one of the {items} and keep the rest of the order.",
    ],
    "change_address": [
        "Please ship my order of {qty} {items} to {city} instead of the old address.",
        "I moved to {city}; can you update the delivery address for the {items}?",
        "The {items} should go to our new office in {city}, not the one on file.",
        "Could you change where the order is sent? {city} is the right city now.",
        "Before the {items} ship, please correct the address to {city}.",
    ],
    "damaged_item": [
        "{qty} of the {items} arrived broken in {city}.",
        "The parcel reached {city} but one {item} inside was cracked.",
        "I opened the box and the {items} were scratched and dented.",
        "The order of {qty} {items} came in {city} with a damaged {item}, what can you do?",
        "Two of the {items} were smashed when the courier delivered them to {city}.",
    ],
}
# Shared openings and closings that carry no intent, so the class is decided by the whole message.
INTENT_OPENINGS = ["", "", "Hi, ", "Hello team, ", "Good morning. ", "This is {name}. ", "Order for {name}: "]
INTENT_CLOSINGS = ["", "", " Thanks!", " Thank you, {name}.", " My order number is {number}.", " Regards, {name}",
                   " I ordered last week."]


def _fill(template: str, fields: dict) -> str:
    return template.format(**fields)


def _task_fields(rng: random.Random) -> dict:
    item = rng.choice(ITEMS)
    qty = rng.choice([2, 3, 4, 5, 6, 8, 10, 12, 15, 20])
    return {"name": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}", "city": rng.choice(CITIES + MULTIWORD_CITIES),
            "item": item, "items": _plural(item, qty),
            "qty": NUMBER_WORDS[qty] if qty in NUMBER_WORDS and rng.random() < 0.3 else str(qty),
            "number": f"#{rng.randint(10000, 99999)}"}


MULTIWORD_CITIES = ["San Sebastian", "Buenos Aires", "Cape Town", "Rio de Janeiro", "New Delhi", "Salt Lake City"]


def generate_classification(records: int, seed: int) -> list[dict]:
    """Customer messages labelled with their intent (6 classes, balanced by construction)."""
    rng = random.Random(seed + 2_000_003)
    labels = sorted(INTENTS)
    rows = []
    for index in range(records):
        label = labels[index % len(labels)]
        fields = _task_fields(rng)
        text = (_fill(rng.choice(INTENT_OPENINGS), fields) + _fill(rng.choice(INTENTS[label]), fields)
                + _fill(rng.choice(INTENT_CLOSINGS), fields))
        rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return rows


# Order notes as token sequences: literal words, and slots that expand to tagged entities.
NER_TEMPLATES = [
    "{PERSON} from {CITY} ordered {QUANTITY} {PRODUCT} .",
    "New order : {QUANTITY} x {PRODUCT} , customer {PERSON} , ship to {CITY} .",
    "Please send {QUANTITY} {PRODUCT} to {PERSON} in {CITY} .",
    "{CITY} branch : {PERSON} wants {QUANTITY} {PRODUCT} asap",
    "Customer {PERSON} ( {CITY} ) placed an order for {QUANTITY} {PRODUCT} .",
    "ship {QUANTITY} {PRODUCT} -> {CITY} , attn {PERSON}",
    "Hi , this is {PERSON} . Could I get {QUANTITY} {PRODUCT} delivered to {CITY} ? Thanks !",
    "The {PRODUCT} for {PERSON} left the warehouse and should reach {CITY} on Monday .",
    "{PERSON} called : the {QUANTITY} {PRODUCT} never arrived in {CITY} .",
    "Return of {QUANTITY} {PRODUCT} approved for {PERSON} , pickup in {CITY} .",
    "Tokyo-based supplier confirmed {QUANTITY} {PRODUCT} for {PERSON} .",
    "Invoice sent to {PERSON} ; the order ships from Washington to {CITY} .",
]


def _entity_words(kind: str, fields: dict) -> list[str]:
    value = {"PERSON": fields["name"], "CITY": fields["city"], "QUANTITY": fields["qty"], "PRODUCT": fields["items"]}[kind]
    return value.split()


def generate_ner(records: int, seed: int) -> list[dict]:
    """Order notes tagged in BIO with PERSON, CITY, QUANTITY and PRODUCT (multi-word people, products and
    cities; words such as "Kowalski" or "Tallinn" that tokenizers split into several pieces). Place names
    outside the slots (Washington as the origin, "Tokyo-based") are not CITY destinations: tagged O."""
    rng = random.Random(seed + 3_000_017)
    rows = []
    for _ in range(records):
        fields = _task_fields(rng)
        tokens: list[str] = []
        tags: list[str] = []
        for word in rng.choice(NER_TEMPLATES).split():
            if word.startswith("{") and word.endswith("}"):
                kind = word[1:-1]
                for position, piece in enumerate(_entity_words(kind, fields)):
                    tokens.append(piece)
                    tags.append(("B-" if position == 0 else "I-") + kind)
            else:
                tokens.append(word)
                tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


# Short order notes, built sentence by sentence so every answer's character offset is known exactly.
QA_SENTENCES = [
    ("{name} from {city} ordered {qty} {items}.", ("name", "city", "qty", "items")),
    ("The order of {qty} {items} was placed by {name}.", ("qty", "items", "name")),
    ("It ships to {city} with tracking number {tracking}.", ("city", "tracking")),
    ("{name} asked for delivery to {city} before {day}.", ("name", "city", "day")),
    ("Payment by card was confirmed for {qty} {items}.", ("qty", "items")),
    ("The courier collects the parcel on {day}.", ("day",)),
]
QA_QUESTIONS = {
    "name": ["Who placed the order?", "What is the customer's name?", "Who is the buyer?"],
    "city": ["Which city does the order ship to?", "Where is the parcel going?", "What is the destination city?"],
    "qty": ["How many items were ordered?", "What quantity was ordered?", "How many units are in the order?"],
    "items": ["What was ordered?", "Which product did the customer buy?", "What product is in the parcel?"],
    "tracking": ["What is the tracking number?", "Which tracking number does the parcel have?"],
    "day": ["On which day is the parcel collected or due?", "What day is mentioned for the delivery?"],
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]


def generate_qa(records: int, seed: int) -> list[dict]:
    """SQuAD-style questions over short order notes; about 10% ask for a field the note does not mention
    (same question wording as answerable ones), with empty answers."""
    rng = random.Random(seed + 4_000_037)
    rows = []
    for index in range(records):
        fields = _task_fields(rng)
        fields["tracking"] = f"TRK{rng.randint(100000, 999999)}"
        fields["day"] = rng.choice(DAYS)
        sentences = rng.sample(QA_SENTENCES, rng.randint(2, 4))
        context, spans = "", {}
        for template, _ in sentences:
            if context:
                context += " "
            # Record where each slot lands; the first mention of a field is the answer.
            for literal, slot, _, _ in string.Formatter().parse(template):
                context += literal
                if slot:
                    spans.setdefault(slot, (len(context), fields[slot]))
                    context += fields[slot]
        present = sorted(spans)
        absent = [key for key in QA_QUESTIONS if key not in spans]
        if absent and rng.random() < 0.1:
            key = rng.choice(absent)
            answers = {"text": [], "answer_start": []}
        else:
            key = rng.choice(present)
            start, text = spans[key]
            assert context[start:start + len(text)] == text
            answers = {"text": [text], "answer_start": [start]}
        rows.append({"id": f"demo-qa-{index}", "context": context, "question": rng.choice(QA_QUESTIONS[key]),
                     "answers": answers})
    return rows


# Product reviews scored 1-5: the opinion word sets the score; an intensifier moves it half a point away
# from the middle (3), a softener half a point towards it.
REVIEW_OPINIONS = {1.0: ["terrible", "useless", "awful"], 2.0: ["poor", "disappointing", "flimsy"],
                   3.0: ["okay", "average", "acceptable"], 4.0: ["good", "solid", "reliable"],
                   5.0: ["excellent", "superb", "outstanding"]}
REVIEW_QUALIFIERS = [("", 0.0), ("really ", 0.5), ("truly ", 0.5), ("somewhat ", -0.5), ("a bit ", -0.5)]
REVIEW_TEMPLATES = ["The {item} is {opinion}.", "My {item} turned out {opinion}.", "{opinion_cap} {item}, honestly.",
                    "I found the {item} {opinion} after a week of use.", "This {item} feels {opinion}."]
REVIEW_EXTRAS = ["", "", " Delivery to {city} took {qty} days.", " Bought {qty} for the office.",
                 " Ordered by {name}."]


def generate_regression(records: int, seed: int) -> list[dict]:
    """Product reviews with their rating as a number (1.0 to 5.0 in half points; 'target')."""
    rng = random.Random(seed + 4_000_037)
    scores = sorted(REVIEW_OPINIONS)
    rows = []
    for index in range(records):
        score = scores[index % len(scores)]
        qualifier, intensity = rng.choice(REVIEW_QUALIFIERS)
        if score == 3.0 or (intensity > 0 and score in (1.0, 5.0)):
            qualifier, intensity = "", 0.0  # "really okay" says nothing; ratings stay within 1-5
        shift = intensity if score > 3.0 else -intensity  # "really poor" is worse than "poor"
        opinion = qualifier + rng.choice(REVIEW_OPINIONS[score])
        fields = _task_fields(rng)
        text = (rng.choice(REVIEW_TEMPLATES).format(item=fields["item"], opinion=opinion, opinion_cap=opinion.capitalize())
                + _fill(rng.choice(REVIEW_EXTRAS), fields))
        rows.append({"text": text, "target": score + shift})
    rng.shuffle(rows)
    return rows


def generate_tasks(records: int, seed: int) -> dict[str, list[dict]]:
    """The task demo sets, keyed by file stem (classification, ner, qa, regression)."""
    return {"classification": generate_classification(records, seed), "ner": generate_ner(records, seed),
            "qa": generate_qa(records, seed), "regression": generate_regression(records, seed)}
