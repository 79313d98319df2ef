"""Our own default counterfactual edits: facts written for this package, not taken from a dataset.

Each fact is a (subject, relation, true object) triple about well-known geography, culture,
science or companies, written out as

- `prompt`: the sentence whose continuation is the object ("The capital of France is"),
- `rephrase`: a paraphrase of the prompt, scored for edit success (ES),
- `true_target`: what the unedited model should say ("Paris"),
- `new_target`: the counterfactual object the edit asks for: another object of the same
  relation, picked by a fixed rule (the entry half the relation's list further on, skipping
  equal objects), so every new target is plausible for its prompt and the choice is reproducible,
- `neighbour_prompt` / `neighbour_target`: an unrelated general-knowledge prompt (science,
  nature, arithmetic; never a subject or relation that is edited) and its answer, scored for
  drawdown (DD) and neighbourhood success.

Which facts are used.  `CANDIDATE_*` below is everything we wrote.  `default_facts()` keeps only
the facts SmolLM2-135M-Instruct (the default model, fp32 on CPU) already gets right, because an
edit of a fact the model does not know measures nothing: `python/check_facts.py` loads the model,
greedy-decodes every prompt and neighbour prompt, and keeps a fact when (1) the greedy
continuation starts with the true target followed by a non-letter, and (2) teacher-forced argmax
predicts every token of the true target (the token-level criterion the metrics use).  Neighbour
prompts pass the same two checks, and only those that pass are dealt out to facts (round-robin).
The script writes the surviving ids into the GENERATED block at the bottom of this file; rerun it
with `--write` after changing the candidates.  Result of the check (fp32, CPU): 169 of 356 facts
and 26 of 59 neighbour prompts.

Neighbours of a train / held-out split.  `default_facts()` deals the known neighbour prompts over
all facts, so after `split_facts` most held-out facts' neighbour prompts are also training facts'
locality prompts (with seed 0: 24 of the 25 held-out facts' at 100 / 25, all 10 at 40 / 10), and an
editor trained with a KL locality loss on them has seen the prompts its DD is scored on.
`deal_disjoint_neighbours(train, heldout, seed)` re-deals them: a seeded shuffle of the known pool
is cut in two, the held-out facts get the first min(len(heldout), ceil(len(pool) / 2)) prompts
round-robin and the training facts the rest (26 prompts: 13 / 13 for 100 training and 25 held-out
facts, 16 / 10 for 40 and 10), so no held-out neighbour prompt is a training locality prompt.
`python/edit_demo.py` applies it after `split_facts` with the same --seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from ._checks import is_int
from .requests import EditRequest


@dataclass(frozen=True)
class Fact:
    """One counterfactual edit and what is needed to evaluate it."""

    id: str
    relation: str
    subject: str
    prompt: str
    rephrase: str
    true_target: str
    new_target: str
    neighbour_prompt: str
    neighbour_target: str

    def request(self) -> EditRequest:
        """The EditRequest asking the model to say `new_target` instead of `true_target`."""
        return EditRequest(
            prompt=self.prompt,
            target=self.new_target,
            rephrase=self.rephrase,
            locality=self.neighbour_prompt,
            locality_target=self.neighbour_target,
            subject=self.subject,
        )


# relation -> (prompt template, rephrase template); "{s}" is the subject.
RELATION_TEMPLATES = {
    "capital": ("The capital of {s} is", "The city that serves as the capital of {s} is"),
    "currency": ("The currency of {s} is the", "In {s}, people pay for things with the"),
    "language": ("The official language of {s} is", "Most people in {s} speak the language called"),
    "continent": ("{s} is a country in the continent of", "The continent where {s} lies is"),
    "city_country": ("{s} is a city in the country of", "The country in which the city of {s} lies is"),
    "landmark_city": ("The {s} is located in the city of", "Tourists who want to see the {s} travel to the city of"),
    "author": ("The novel {s} was written by", "The author of the book {s} is"),
    "maker": ("The {s} is made by the company", "The company that makes the {s} is"),
    "inventor": ("The {s} was invented by", "The person credited with inventing the {s} is"),
}

CANDIDATE_FACTS: dict[str, list[tuple[str, str]]] = {
    "capital": [
        ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
        ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"),
        ("Egypt", "Cairo"), ("Greece", "Athens"), ("Austria", "Vienna"), ("Poland", "Warsaw"),
        ("Hungary", "Budapest"), ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Finland", "Helsinki"),
        ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("the Netherlands", "Amsterdam"),
        ("Belgium", "Brussels"), ("the Czech Republic", "Prague"), ("Turkey", "Ankara"),
        ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
        ("South Korea", "Seoul"), ("Indonesia", "Jakarta"), ("the Philippines", "Manila"),
        ("India", "New Delhi"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"),
        ("Kenya", "Nairobi"), ("Nigeria", "Abuja"), ("Ethiopia", "Addis Ababa"),
        ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"),
        ("Colombia", "Bogotá"), ("Venezuela", "Caracas"), ("Cuba", "Havana"),
        ("Mexico", "Mexico City"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
        ("New Zealand", "Wellington"), ("the United Kingdom", "London"), ("Scotland", "Edinburgh"),
        ("Switzerland", "Bern"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"),
        ("Ukraine", "Kyiv"), ("Saudi Arabia", "Riyadh"), ("Syria", "Damascus"),
        ("Lebanon", "Beirut"), ("Afghanistan", "Kabul"), ("Malaysia", "Kuala Lumpur"),
        ("Morocco", "Rabat"), ("Algeria", "Algiers"), ("Tunisia", "Tunis"), ("Ghana", "Accra"),
        ("Senegal", "Dakar"), ("Uganda", "Kampala"), ("Jamaica", "Kingston"),
        ("Iceland", "Reykjavik"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
        ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"),
        ("Nepal", "Kathmandu"), ("Qatar", "Doha"), ("Zimbabwe", "Harare"), ("Brazil", "Brasília"),
        ("the United States", "Washington"), ("Wales", "Cardiff"), ("Slovakia", "Bratislava"),
        ("Slovenia", "Ljubljana"), ("Jordan", "Amman"), ("Sri Lanka", "Colombo"),
    ],
    "currency": [
        ("Japan", "yen"), ("the United Kingdom", "pound"), ("the United States", "dollar"),
        ("India", "rupee"), ("China", "yuan"), ("Russia", "ruble"), ("Mexico", "peso"),
        ("Brazil", "real"), ("South Korea", "won"), ("Switzerland", "franc"), ("Thailand", "baht"),
        ("Poland", "zloty"), ("Turkey", "lira"), ("South Africa", "rand"), ("Sweden", "krona"),
        ("Israel", "shekel"), ("Vietnam", "dong"), ("Indonesia", "rupiah"),
        ("Saudi Arabia", "riyal"), ("Nigeria", "naira"), ("Kenya", "shilling"),
        ("Germany", "euro"), ("France", "euro"), ("Italy", "euro"), ("Spain", "euro"),
        ("Argentina", "peso"), ("Pakistan", "rupee"), ("Ukraine", "hryvnia"),
        ("Hungary", "forint"), ("Malaysia", "ringgit"), ("Bangladesh", "taka"),
        ("Australia", "dollar"), ("Canada", "dollar"), ("Egypt", "pound"), ("Denmark", "krone"),
        ("Norway", "krone"), ("Iran", "rial"), ("Chile", "peso"), ("Colombia", "peso"),
        ("the Philippines", "peso"), ("Greece", "euro"), ("Portugal", "euro"),
    ],
    "language": [
        ("France", "French"), ("Germany", "German"), ("Italy", "Italian"), ("Spain", "Spanish"),
        ("Portugal", "Portuguese"), ("Brazil", "Portuguese"), ("Japan", "Japanese"),
        ("China", "Chinese"), ("Russia", "Russian"), ("Greece", "Greek"), ("Poland", "Polish"),
        ("the Netherlands", "Dutch"), ("Sweden", "Swedish"), ("Norway", "Norwegian"),
        ("Finland", "Finnish"), ("Denmark", "Danish"), ("Turkey", "Turkish"), ("Iran", "Persian"),
        ("Israel", "Hebrew"), ("Thailand", "Thai"), ("Vietnam", "Vietnamese"),
        ("South Korea", "Korean"), ("Hungary", "Hungarian"), ("the Czech Republic", "Czech"),
        ("Romania", "Romanian"), ("Ukraine", "Ukrainian"), ("Mexico", "Spanish"),
        ("Argentina", "Spanish"), ("Egypt", "Arabic"), ("Saudi Arabia", "Arabic"),
        ("Indonesia", "Indonesian"), ("Austria", "German"), ("Bulgaria", "Bulgarian"),
        ("Serbia", "Serbian"), ("Croatia", "Croatian"), ("Colombia", "Spanish"),
        ("Peru", "Spanish"), ("Iceland", "Icelandic"), ("Estonia", "Estonian"),
        ("Latvia", "Latvian"), ("Lithuania", "Lithuanian"), ("Slovakia", "Slovak"),
        ("Albania", "Albanian"), ("Armenia", "Armenian"), ("Georgia", "Georgian"),
    ],
    "continent": [
        ("France", "Europe"), ("Germany", "Europe"), ("Italy", "Europe"), ("Spain", "Europe"),
        ("Japan", "Asia"), ("China", "Asia"), ("India", "Asia"), ("Thailand", "Asia"),
        ("Vietnam", "Asia"), ("Mongolia", "Asia"), ("Nepal", "Asia"), ("Egypt", "Africa"),
        ("Kenya", "Africa"), ("Nigeria", "Africa"), ("Ghana", "Africa"), ("Ethiopia", "Africa"),
        ("Morocco", "Africa"), ("Senegal", "Africa"), ("Zimbabwe", "Africa"), ("Uganda", "Africa"),
        ("Brazil", "South America"), ("Argentina", "South America"), ("Peru", "South America"),
        ("Chile", "South America"), ("Colombia", "South America"), ("Bolivia", "South America"),
        ("Canada", "North America"), ("Mexico", "North America"), ("Australia", "Australia"),
        ("Poland", "Europe"), ("Sweden", "Europe"), ("Norway", "Europe"), ("Pakistan", "Asia"),
        ("Indonesia", "Asia"), ("Cambodia", "Asia"), ("Laos", "Asia"), ("Tanzania", "Africa"),
        ("Cameroon", "Africa"), ("Angola", "Africa"), ("Paraguay", "South America"),
        ("Uruguay", "South America"), ("Ecuador", "South America"), ("Venezuela", "South America"),
    ],
    "city_country": [
        ("Tokyo", "Japan"), ("Osaka", "Japan"), ("Kyoto", "Japan"), ("Munich", "Germany"),
        ("Hamburg", "Germany"), ("Frankfurt", "Germany"), ("Milan", "Italy"), ("Venice", "Italy"),
        ("Naples", "Italy"), ("Florence", "Italy"), ("Barcelona", "Spain"), ("Seville", "Spain"),
        ("Valencia", "Spain"), ("Lyon", "France"), ("Marseille", "France"), ("Toronto", "Canada"),
        ("Vancouver", "Canada"), ("Montreal", "Canada"), ("Sydney", "Australia"),
        ("Melbourne", "Australia"), ("Mumbai", "India"), ("Kolkata", "India"),
        ("Bangalore", "India"), ("Shanghai", "China"), ("Shenzhen", "China"), ("Istanbul", "Turkey"),
        ("Rio de Janeiro", "Brazil"), ("São Paulo", "Brazil"), ("Manchester", "England"),
        ("Liverpool", "England"), ("Rotterdam", "the Netherlands"), ("Krakow", "Poland"),
        ("Saint Petersburg", "Russia"), ("Alexandria", "Egypt"), ("Porto", "Portugal"),
        ("Zurich", "Switzerland"), ("Geneva", "Switzerland"), ("Lagos", "Nigeria"),
        ("Johannesburg", "South Africa"), ("Cape Town", "South Africa"), ("Casablanca", "Morocco"),
        ("Busan", "South Korea"), ("Glasgow", "Scotland"), ("Salzburg", "Austria"),
        ("Gothenburg", "Sweden"), ("Bergen", "Norway"), ("Chicago", "the United States"),
        ("Guadalajara", "Mexico"), ("Medellín", "Colombia"), ("Ho Chi Minh City", "Vietnam"),
    ],
    "landmark_city": [
        ("Eiffel Tower", "Paris"), ("Colosseum", "Rome"), ("Big Ben", "London"),
        ("Statue of Liberty", "New York"), ("Brandenburg Gate", "Berlin"),
        ("Sagrada Familia", "Barcelona"), ("Kremlin", "Moscow"), ("Forbidden City", "Beijing"),
        ("Acropolis", "Athens"), ("Louvre", "Paris"), ("Sydney Opera House", "Sydney"),
        ("Golden Gate Bridge", "San Francisco"), ("Burj Khalifa", "Dubai"),
        ("Leaning Tower of Pisa", "Pisa"), ("Space Needle", "Seattle"),
        ("Empire State Building", "New York"), ("CN Tower", "Toronto"),
        ("Christ the Redeemer statue", "Rio de Janeiro"), ("Tower of London", "London"),
        ("Buckingham Palace", "London"), ("White House", "Washington"), ("Alhambra", "Granada"),
        ("Hagia Sophia", "Istanbul"), ("Petronas Towers", "Kuala Lumpur"),
        ("Red Square", "Moscow"), ("Parthenon", "Athens"), ("Prado Museum", "Madrid"),
        ("Rijksmuseum", "Amsterdam"), ("Taj Mahal", "Agra"), ("Brooklyn Bridge", "New York"),
        ("Notre-Dame Cathedral", "Paris"), ("Trevi Fountain", "Rome"), ("Charles Bridge", "Prague"),
        ("Arc de Triomphe", "Paris"), ("Westminster Abbey", "London"), ("Pantheon", "Rome"),
        ("Lincoln Memorial", "Washington"), ("Hollywood Walk of Fame", "Los Angeles"),
    ],
    "author": [
        ("Romeo and Juliet", "William Shakespeare"), ("Hamlet", "William Shakespeare"),
        ("War and Peace", "Leo Tolstoy"), ("Anna Karenina", "Leo Tolstoy"),
        ("Don Quixote", "Miguel de Cervantes"), ("Pride and Prejudice", "Jane Austen"),
        ("Nineteen Eighty-Four", "George Orwell"), ("Animal Farm", "George Orwell"),
        ("Oliver Twist", "Charles Dickens"), ("Great Expectations", "Charles Dickens"),
        ("Moby-Dick", "Herman Melville"), ("The Old Man and the Sea", "Ernest Hemingway"),
        ("Crime and Punishment", "Fyodor Dostoevsky"), ("The Great Gatsby", "F. Scott Fitzgerald"),
        ("Frankenstein", "Mary Shelley"), ("Dracula", "Bram Stoker"),
        ("The Hobbit", "J.R.R. Tolkien"), ("The Lord of the Rings", "J.R.R. Tolkien"),
        ("Les Misérables", "Victor Hugo"), ("The Adventures of Tom Sawyer", "Mark Twain"),
        ("Harry Potter and the Philosopher's Stone", "J.K. Rowling"),
        ("To Kill a Mockingbird", "Harper Lee"), ("Jane Eyre", "Charlotte Brontë"),
        ("Wuthering Heights", "Emily Brontë"), ("The Time Machine", "H.G. Wells"),
    ],
    "maker": [
        ("iPhone", "Apple"), ("iPad", "Apple"), ("PlayStation", "Sony"), ("Xbox", "Microsoft"),
        ("Galaxy smartphone", "Samsung"), ("Corolla", "Toyota"), ("Prius", "Toyota"),
        ("Mustang", "Ford"), ("Civic", "Honda"), ("Golf", "Volkswagen"), ("Beetle", "Volkswagen"),
        ("Model S", "Tesla"), ("Pixel phone", "Google"), ("ThinkPad", "Lenovo"),
        ("Boeing 747", "Boeing"), ("Kindle", "Amazon"), ("Switch game console", "Nintendo"),
        ("Walkman", "Sony"), ("MacBook", "Apple"), ("Surface tablet", "Microsoft"),
        ("Camry", "Toyota"), ("911 sports car", "Porsche"),
    ],
    "inventor": [
        ("telephone", "Alexander Graham Bell"), ("light bulb", "Thomas Edison"),
        ("World Wide Web", "Tim Berners-Lee"), ("printing press", "Johannes Gutenberg"),
        ("airplane", "the Wright brothers"), ("dynamite", "Alfred Nobel"),
        ("radio", "Guglielmo Marconi"), ("steam engine", "James Watt"),
        ("phonograph", "Thomas Edison"), ("polio vaccine", "Jonas Salk"),
        ("theory of relativity", "Albert Einstein"), ("periodic table", "Dmitri Mendeleev"),
    ],
}

# Unrelated general-knowledge prompts for drawdown: none mentions a place, person or company that
# an edit is about, so a change in their prediction is collateral damage, not a wanted effect.
CANDIDATE_NEIGHBOURS: list[tuple[str, str]] = [
    ("The chemical symbol for gold is", "Au"),
    ("Water is made of hydrogen and", "oxygen"),
    ("The largest planet in our solar system is", "Jupiter"),
    ("The opposite of hot is", "cold"),
    ("On a clear day, the color of the sky is", "blue"),
    ("Bees make", "honey"),
    ("Water freezes at zero degrees", "Celsius"),
    ("The sun rises in the", "east"),
    ("Two plus two equals", "four"),
    ("A baby cat is called a", "kitten"),
    ("A baby dog is called a", "puppy"),
    ("The tallest animal in the world is the", "giraffe"),
    ("The largest ocean on Earth is the", "Pacific"),
    ("The planet closest to the sun is", "Mercury"),
    ("The Earth orbits the", "Sun"),
    ("Plants make their food through a process called", "photosynthesis"),
    ("The month after January is", "February"),
    ("The heart pumps", "blood"),
    ("Spiders have eight", "legs"),
    ("A triangle has three", "sides"),
    ("The opposite of up is", "down"),
    ("Fish breathe through their", "gills"),
    ("The planet known as the Red Planet is", "Mars"),
    ("A year has twelve", "months"),
    ("Christmas is celebrated in the month of", "December"),
    ("Diamonds are made of", "carbon"),
    ("The Moon orbits the", "Earth"),
    ("The study of living things is called", "biology"),
    ("The opposite of day is", "night"),
    ("A group of wolves is called a", "pack"),
    ("The primary gas that we breathe out is carbon", "dioxide"),
    ("The largest mammal on Earth is the blue", "whale"),
    ("The number of days in a week is", "seven"),
    ("Ice is the solid form of", "water"),
    ("The hardest natural substance is", "diamond"),
    ("Humans have two eyes and one", "nose"),
    ("The day after Monday is", "Tuesday"),
    ("The season after winter is", "spring"),
    ("The force that pulls objects toward the Earth is called", "gravity"),
    ("A caterpillar turns into a", "butterfly"),
    ("The freezing point of water in Fahrenheit is 32", "degrees"),
    ("The chemical formula for table salt is", "NaCl"),
    ("The square root of 81 is", "9"),
    ("The opposite of black is", "white"),
    ("Frogs are a type of", "amphibian"),
    ("The part of the plant that absorbs water from the soil is the", "root"),
    ("The smallest unit of life is the", "cell"),
    ("Lightning is followed by the sound of", "thunder"),
    ("A doctor who treats teeth is called a", "dentist"),
    ("The organ that helps us breathe is the", "lungs"),
    ("Rainbows have seven", "colors"),
    ("Ten minus three equals", "seven"),
    ("The liquid that cows produce is", "milk"),
    ("The animal known as the king of the jungle is the", "lion"),
    ("An octopus has eight", "arms"),
    ("The opposite of early is", "late"),
    ("The color of grass is", "green"),
    ("Sound travels through the air as a", "wave"),
    ("The process of water turning into vapor is called", "evaporation"),
]


def candidate_facts() -> list[Fact]:
    """All facts we wrote, before the SmolLM2 check (`python/check_facts.py` filters these).

    Neighbours are assigned round-robin over the known neighbour prompts (over all of them while
    the known list is empty, i.e. before the check script has been run).
    """
    facts = []
    for relation, pairs in CANDIDATE_FACTS.items():
        prompt_tpl, rephrase_tpl = RELATION_TEMPLATES[relation]
        n = len(pairs)
        for i, (subject, obj) in enumerate(pairs):
            # Half the list further on, then onwards until the object differs: a plausible object
            # of the same relation that is not the truth (several countries share the euro).
            j = (i + n // 2) % n
            while pairs[j][1] == obj:
                j = (j + 1) % n
            facts.append(
                Fact(
                    id=f"{relation}/{subject}",
                    relation=relation,
                    subject=subject,
                    prompt=prompt_tpl.format(s=subject),
                    rephrase=rephrase_tpl.format(s=subject),
                    true_target=obj,
                    new_target=pairs[j][1],
                    neighbour_prompt="",
                    neighbour_target="",
                )
            )
    return _with_neighbours(facts)


def _neighbour_pool() -> list[tuple[str, str]]:
    """The known neighbour (prompt, answer) pairs in candidate order (all candidates while the
    known list is empty, i.e. before the check script has been run)."""
    known = set(SMOLLM2_KNOWN_NEIGHBOURS)
    return [n for n in CANDIDATE_NEIGHBOURS if n[0] in known] or list(CANDIDATE_NEIGHBOURS)


def _deal(facts: list[Fact], pool: list[tuple[str, str]]) -> list[Fact]:
    """`facts` with neighbours dealt round-robin from `pool` (each pool entry serves at most
    ceil(len(facts) / len(pool)) facts)."""
    return [
        replace(fact, neighbour_prompt=pool[k % len(pool)][0], neighbour_target=pool[k % len(pool)][1])
        for k, fact in enumerate(facts)
    ]


def _with_neighbours(facts: list[Fact]) -> list[Fact]:
    """`facts` with neighbours dealt round-robin from the known neighbour prompts, so that each
    neighbour serves about equally many facts (at most ceil(len(facts) / len(pool)))."""
    return _deal(facts, _neighbour_pool())


def default_facts() -> list[Fact]:
    """The facts SmolLM2-135M-Instruct gets right before editing (see the module docstring)."""
    known = set(SMOLLM2_KNOWN_FACTS)
    return _with_neighbours([f for f in candidate_facts() if f.id in known])


def _check_facts(facts, name: str = "facts", items: bool = True) -> list:
    """`facts` listed (empty is fine), ValueError naming the argument for a str (split_facts(
    "counterfact", 2, 2) returned two lists of its letters) or no sequence, and with `items` unless
    each is a Fact (one that is not raised a bare AttributeError, .request or .id).  split_facts reads
    no field of its items, so it shuffles any sequence's (EditRequests too) as before."""
    if isinstance(facts, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of Fact, got a {type(facts).__name__}")
    try:
        facts = list(facts)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of Fact, got {type(facts).__name__}") from None
    for i, fact in enumerate(facts if items else ()):
        if not isinstance(fact, Fact):
            raise ValueError(f"{name}[{i}] must be a Fact, got {type(fact).__name__}")
    return facts


def default_requests(facts: Iterable[Fact] | None = None) -> list[EditRequest]:
    """EditRequests for `facts` (default: `default_facts()`)."""
    return [f.request() for f in (default_facts() if facts is None else _check_facts(facts))]


def split_facts(facts: Sequence[Fact], n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[Fact], list[Fact]]:
    """A seeded shuffle of `facts` cut into `n_train` editor-training and `n_heldout` held-out facts.

    Raises ValueError when there are fewer than n_train + n_heldout facts, or (naming the argument)
    when `n_train` / `n_heldout` is not a non-negative int or `seed` is not an int (None would seed
    from the clock, so the split would differ from call to call).  Held-out facts are taken first,
    so growing `n_train` never changes the held-out set for a given seed.
    """
    facts = _check_facts(facts, items=False)
    for name, value in (("n_train", n_train), ("n_heldout", n_heldout)):
        if not is_int(value) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if not is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if n_train + n_heldout > len(facts):
        raise ValueError(
            f"n_train + n_heldout ({n_train} + {n_heldout}) exceeds the {len(facts)} facts available"
        )
    order = list(range(len(facts)))
    random.Random(seed).shuffle(order)
    heldout = [facts[i] for i in order[:n_heldout]]
    train = [facts[i] for i in order[n_heldout : n_heldout + n_train]]
    return train, heldout


def deal_disjoint_neighbours(
    train: Iterable[Fact], heldout: Iterable[Fact], seed: int = 0, n_heldout_neighbours: int | None = None
) -> tuple[list[Fact], list[Fact]]:
    """(train, heldout) with their neighbours re-dealt from two disjoint parts of the known pool,
    so that no prompt DD is scored on for `heldout` is a locality prompt of `train` (the editors'
    KL locality loss trains on those).

    A seeded shuffle (`seed`) of the known neighbour pool is cut in two: its first
    `n_heldout_neighbours` prompts are dealt round-robin to `heldout`, the rest round-robin to
    `train`.  The default is min(len(heldout), ceil(len(pool) / 2)): held-out facts get distinct
    prompts while there are at most half the pool of them, and never more than half the pool, so
    training keeps at least the other half (26 known prompts: 13 for 25 held-out facts, each
    serving at most two of them, and 13 for the training facts; 10 and 16 for 10 held-out facts).
    Facts, their order and every other field are kept; the held-out facts' neighbours depend only
    on `heldout`, `seed` and the pool (and `n_heldout_neighbours`), never on `train`.

    Raises ValueError (naming the argument) when `train` and `heldout` share a fact id, when
    `seed` is not an int, or when `n_heldout_neighbours` is not an int that leaves both non-empty
    sets at least one prompt.
    """
    if not is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    # Listed once: a generator for `train` was read up by the check below, and none came back.
    train, heldout = _check_facts(train, "train"), _check_facts(heldout, "heldout")
    shared = {f.id for f in train} & {f.id for f in heldout}
    if shared:
        raise ValueError(f"train and heldout share {len(shared)} fact(s), e.g. {sorted(shared)[0]!r}")
    pool = _neighbour_pool()
    if n_heldout_neighbours is None:
        n_heldout_neighbours = min(len(heldout), (len(pool) + 1) // 2)
    lo = 1 if heldout else 0
    hi = 0 if not heldout else len(pool) - 1 if train else len(pool)
    if not is_int(n_heldout_neighbours) or not lo <= n_heldout_neighbours <= hi:
        raise ValueError(
            f"n_heldout_neighbours must be an int in [{lo}, {hi}] for {len(train)} training and "
            f"{len(heldout)} held-out facts and {len(pool)} neighbour prompts, got {n_heldout_neighbours!r}"
        )
    order = list(pool)
    random.Random(seed).shuffle(order)
    return _deal(train, order[n_heldout_neighbours:]), _deal(heldout, order[:n_heldout_neighbours])


# BEGIN GENERATED by python/check_facts.py --write (do not edit by hand)
SMOLLM2_KNOWN_FACTS: tuple[str, ...] = (
    'capital/France',
    'capital/Germany',
    'capital/Italy',
    'capital/Spain',
    'capital/Portugal',
    'capital/Japan',
    'capital/China',
    'capital/Russia',
    'capital/Greece',
    'capital/Austria',
    'capital/Hungary',
    'capital/Sweden',
    'capital/Norway',
    'capital/Denmark',
    'capital/Ireland',
    'capital/the Netherlands',
    'capital/the Czech Republic',
    'capital/Thailand',
    'capital/Vietnam',
    'capital/South Korea',
    'capital/Indonesia',
    'capital/the Philippines',
    'capital/Pakistan',
    'capital/Bangladesh',
    'capital/Kenya',
    'capital/Ethiopia',
    'capital/Chile',
    'capital/Cuba',
    'capital/Mexico',
    'capital/Canada',
    'capital/the United Kingdom',
    'capital/Scotland',
    'capital/Romania',
    'capital/Bulgaria',
    'capital/Syria',
    'capital/Afghanistan',
    'capital/Malaysia',
    'capital/Uganda',
    'capital/Iceland',
    'capital/Latvia',
    'capital/Brazil',
    'capital/the United States',
    'capital/Wales',
    'currency/Japan',
    'currency/the United Kingdom',
    'currency/India',
    'currency/China',
    'currency/Russia',
    'currency/Mexico',
    'currency/South Africa',
    'currency/Indonesia',
    'currency/Argentina',
    'currency/the Philippines',
    'language/France',
    'language/Germany',
    'language/Italy',
    'language/Spain',
    'language/Russia',
    'language/Poland',
    'language/the Netherlands',
    'language/Turkey',
    'language/Israel',
    'language/Thailand',
    'language/Vietnam',
    'language/Romania',
    'language/Mexico',
    'language/Argentina',
    'language/Egypt',
    'language/Saudi Arabia',
    'language/Austria',
    'language/Serbia',
    'language/Croatia',
    'language/Colombia',
    'language/Peru',
    'language/Albania',
    'continent/France',
    'continent/Germany',
    'continent/Italy',
    'continent/Spain',
    'continent/Kenya',
    'continent/Nigeria',
    'continent/Ghana',
    'continent/Ethiopia',
    'continent/Zimbabwe',
    'continent/Uganda',
    'continent/Argentina',
    'continent/Poland',
    'continent/Sweden',
    'continent/Norway',
    'continent/Tanzania',
    'continent/Cameroon',
    'continent/Angola',
    'continent/Paraguay',
    'continent/Uruguay',
    'continent/Ecuador',
    'continent/Venezuela',
    'city_country/Tokyo',
    'city_country/Osaka',
    'city_country/Kyoto',
    'city_country/Munich',
    'city_country/Hamburg',
    'city_country/Frankfurt',
    'city_country/Barcelona',
    'city_country/Valencia',
    'city_country/Lyon',
    'city_country/Marseille',
    'city_country/Toronto',
    'city_country/Vancouver',
    'city_country/Sydney',
    'city_country/Melbourne',
    'city_country/Mumbai',
    'city_country/Bangalore',
    'city_country/Shanghai',
    'city_country/Shenzhen',
    'city_country/Istanbul',
    'city_country/Rio de Janeiro',
    'city_country/São Paulo',
    'city_country/Manchester',
    'city_country/Liverpool',
    'city_country/Krakow',
    'city_country/Saint Petersburg',
    'city_country/Glasgow',
    'city_country/Salzburg',
    'city_country/Guadalajara',
    'city_country/Ho Chi Minh City',
    'landmark_city/Eiffel Tower',
    'landmark_city/Colosseum',
    'landmark_city/Statue of Liberty',
    'landmark_city/Brandenburg Gate',
    'landmark_city/Sagrada Familia',
    'landmark_city/Kremlin',
    'landmark_city/Acropolis',
    'landmark_city/Louvre',
    'landmark_city/Sydney Opera House',
    'landmark_city/Golden Gate Bridge',
    'landmark_city/Burj Khalifa',
    'landmark_city/Leaning Tower of Pisa',
    'landmark_city/Empire State Building',
    'landmark_city/Tower of London',
    'landmark_city/White House',
    'landmark_city/Hagia Sophia',
    'landmark_city/Parthenon',
    'landmark_city/Prado Museum',
    'landmark_city/Rijksmuseum',
    'landmark_city/Taj Mahal',
    'landmark_city/Brooklyn Bridge',
    'landmark_city/Pantheon',
    'landmark_city/Hollywood Walk of Fame',
    'author/Romeo and Juliet',
    'author/Hamlet',
    'author/Nineteen Eighty-Four',
    'author/Moby-Dick',
    'author/The Great Gatsby',
    'author/Frankenstein',
    'author/Dracula',
    'author/The Hobbit',
    'author/The Lord of the Rings',
    "author/Harry Potter and the Philosopher's Stone",
    'author/To Kill a Mockingbird',
    'author/Jane Eyre',
    'maker/iPhone',
    'maker/Galaxy smartphone',
    'maker/Boeing 747',
    'maker/MacBook',
    'inventor/telephone',
    'inventor/light bulb',
    'inventor/World Wide Web',
    'inventor/polio vaccine',
    'inventor/theory of relativity',
)
SMOLLM2_KNOWN_NEIGHBOURS: tuple[str, ...] = (
    'The chemical symbol for gold is',
    'The largest planet in our solar system is',
    'The opposite of hot is',
    'Water freezes at zero degrees',
    'A baby cat is called a',
    'The largest ocean on Earth is the',
    'The planet closest to the sun is',
    'The Earth orbits the',
    'The heart pumps',
    'Spiders have eight',
    'A triangle has three',
    'The opposite of up is',
    'A year has twelve',
    'The Moon orbits the',
    'A group of wolves is called a',
    'The primary gas that we breathe out is carbon',
    'The largest mammal on Earth is the blue',
    'The force that pulls objects toward the Earth is called',
    'A caterpillar turns into a',
    'The freezing point of water in Fahrenheit is 32',
    'The chemical formula for table salt is',
    'The opposite of black is',
    'The part of the plant that absorbs water from the soil is the',
    'A doctor who treats teeth is called a',
    'An octopus has eight',
    'The process of water turning into vapor is called',
)
# END GENERATED
