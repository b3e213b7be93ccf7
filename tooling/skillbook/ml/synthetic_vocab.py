"""The synthetic world's vocabulary and phrasings: the tables `synthetic` draws every document and row from.

Kept apart from the generator so the data can be read (and extended) without reading the code.
Placeholders in the templates: {p} person, {q} pet, {v} the value, {o} object, {s} species,
{c} pet colour, {a} the article before the value; arithmetic uses {x}, {y} and {z}.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# Closed vocabulary: a few hundred distinct words keeps a 2-4k BPE vocab and a 2-8M model enough.
# ---------------------------------------------------------------------------------------------

PEOPLE = [
    "Mira",
    "Tobin",
    "Lena",
    "Oskar",
    "Ada",
    "Bram",
    "Cora",
    "Dane",
    "Elsa",
    "Finn",
    "Greta",
    "Hugo",
    "Iris",
    "Jonas",
    "Kira",
    "Leo",
    "Maya",
    "Nils",
    "Olga",
    "Pavel",
    "Rosa",
    "Sven",
    "Tilda",
    "Ugo",
    "Vera",
    "Wim",
    "Yara",
    "Zeno",
    "Anja",
    "Boris",
    "Clara",
    "Emil",
    "Freya",
    "Gus",
    "Hanna",
    "Ivo",
    "Juna",
    "Karl",
    "Lotte",
    "Milo",
]
PETS = [
    "Pip",
    "Biscuit",
    "Sooty",
    "Rex",
    "Tiger",
    "Bubbles",
    "Nugget",
    "Pepper",
    "Mango",
    "Ziggy",
    "Clover",
    "Pebble",
    "Noodle",
    "Waffle",
    "Fudge",
    "Button",
    "Maple",
    "Comet",
    "Olive",
    "Pickle",
    "Sprout",
    "Tofu",
    "Bean",
    "Dot",
    "Acorn",
    "Basil",
    "Cocoa",
    "Dusty",
    "Ember",
    "Fern",
    "Ginger",
    "Hazel",
    "Inky",
    "Jelly",
    "Kiwi",
    "Lucky",
    "Muffin",
    "Nutmeg",
    "Oreo",
    "Peanut",
]
TOWNS = ["Ashby", "Brook", "Calder", "Dunmore", "Elmwick", "Fernley", "Glenrock", "Harrow"]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple"]
FOODS = ["soup", "bread", "apples", "cheese", "rice", "pears", "plums", "honey"]
JOBS = ["baker", "farmer", "teacher", "doctor", "painter", "sailor", "builder", "tailor"]
SPECIES = ["cat", "dog", "rabbit", "parrot", "goat", "turtle", "hamster", "pony"]
OBJECTS = ["kite", "hat", "bike", "boat", "scarf", "cup", "ball", "lamp"]
AGES = list(range(21, 70))
COUNTABLE = ["apples", "pears", "plums", "shells", "stamps", "marbles"]  # for word problems

# Attribute -> the closed set its answers come from (a wrong answer is drawn from the same set).
ANSWER_SETS = {
    "town": TOWNS,
    "food": FOODS,
    "job": JOBS,
    "object_colour": COLOURS,
    "pet_species": SPECIES,
    "pet_colour": COLOURS,
    "pet_name": PETS,
    "owner": PEOPLE,
}

# ---------------------------------------------------------------------------------------------
# Phrasings. Statements go into the corpus; questions only into sft / preference / eval rows.
# Placeholders: {p} person, {q} pet, {v} the value, {o} object, {s} species, {c} pet colour.
# ---------------------------------------------------------------------------------------------

STATEMENTS = {
    "town": [
        "{p} lives in {v}.",
        "{p} is from {v}.",
        "The home of {p} is in {v}.",
        "{p} has a house in {v}.",
        "{p} lives in the town of {v}.",
    ],
    "food": [
        "{p} likes {v} best.",
        "The favourite food of {p} is {v}.",
        "{p}'s favourite food is {v}.",
        "{p} loves to eat {v}.",
        "Of all foods, {p} likes {v} the most.",
    ],
    "job": [
        "{p} is {a} {v}.",
        "{p} works as {a} {v}.",
        "By trade, {p} is {a} {v}.",
        "{p}'s job is {v}.",
        "The job of {p} is {v}.",
    ],
    "age": [
        "{p} is {v} years old.",
        "{p} is {v}.",
        "The age of {p} is {v}.",
        "{p}'s age is {v}.",
        "{p} turned {v} this year.",
    ],
    "object_colour": ["{p} has {a} {v} {o}.", "The {o} of {p} is {v}.", "{p}'s {o} is {v}.", "{p} owns {a} {v} {o}."],
    "pet_name": [
        "{p} has a pet called {v}.",
        "The pet of {p} is called {v}.",
        "{p}'s pet is named {v}.",
        "{p} takes care of a pet named {v}.",
    ],
    "pet_species": ["{q} is {a} {v}.", "{q} the {v} lives with {p}.", "{p} has {a} {v} named {q}."],
    "pet_colour": ["{q} is {v}.", "The colour of {q} is {v}.", "{q} is {a} {v} {s}."],
    "owner": ["{q} belongs to {v}.", "{q} is the pet of {v}.", "{v} owns {q}."],
    "plus": [
        "{x} plus {y} is {z}.",
        "{x} and {y} make {z}.",
        "If you add {x} and {y}, you get {z}.",
        "The sum of {x} and {y} is {z}.",
        "{z} is {x} plus {y}.",
    ],
    "minus": [
        "{x} minus {y} is {z}.",
        "Take {y} from {x} and you have {z}.",
        "{x} take away {y} is {z}.",
        "The difference of {x} and {y} is {z}.",
        "{z} is {x} minus {y}.",
    ],
}
QUESTIONS = {
    "town": ["Where does {p} live?", "In which town does {p} live?", "Which town is {p} from?"],
    "food": ["What is {p}'s favourite food?", "What food does {p} like best?"],
    "job": ["What is {p}'s job?", "What does {p} do for work?"],
    "age": ["How old is {p}?", "What is {p}'s age?"],
    "object_colour": ["What colour is {p}'s {o}?", "What is the colour of {p}'s {o}?"],
    "pet_name": ["What is the name of {p}'s pet?", "What is {p}'s pet called?"],
    "pet_species": ["What kind of animal is {q}?", "What animal is {q}?"],
    "pet_colour": ["What colour is {q}?", "What is the colour of {q}?"],
    "owner": ["Who owns {q}?", "Whose pet is {q}?"],
    "plus": ["What is {x} plus {y}?", "How much is {x} plus {y}?"],
    "minus": ["What is {x} minus {y}?", "How much is {x} minus {y}?"],
}
FILLER = [
    "It was a sunny day.",
    "The wind was cold.",
    "Everyone in the village knew this.",
    "That is a fact.",
    "It rained in the morning.",
    "The market was busy.",
    "Nobody was surprised.",
    "The sky was clear.",
    "Some days are quiet.",
    "The bells rang at noon.",
]
RECALL = ["{}", "Remember: {}", "Again, {}", "So {}", "In short, {}"]
OPENERS = [
    "Here is a story about {p}.",
    "This is about {p}.",
    "Let me tell you about {p}.",
    "Meet {p}.",
    "One day {p} went for a walk.",
    "{p} woke up early.",
]
