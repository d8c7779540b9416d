"""Synthetic doctor-patient dialogues for the demo and tests: invented people, templated clinical content.

Every dialogue is generated from its own random stream seeded by `(seed, index)`, so `generate_dialogues(n)` is a
prefix of `generate_dialogues(m)` for n <= m and the output never depends on the platform. The text is built from
the lists below; no real person, record or transcript goes in.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

# Obviously invented names: nobody real is described.
_FIRST_NAMES = ("Alex", "Sam", "Robin", "Kim", "Jordan", "Casey", "Morgan", "Riley", "Taylor", "Jamie", "Avery",
                "Quinn")
_LAST_NAMES = ("Exampleton", "Sampleby", "Mockford", "Testwood", "Placeholder", "Fictus", "Dummington", "Synthwright")
_DOCTORS = ("Dr. Placebo", "Dr. Synthia", "Dr. Sample", "Dr. Mockingbird")

# condition: (patient's complaint, symptoms the patient may confirm, targeted questions, assessment, plan steps)
_CONDITIONS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str, tuple[str, ...]]] = {
    "hypertension": (
        "my blood pressure readings at the pharmacy have been high",
        ("a dull headache in the mornings", "some dizziness when I stand up", "no chest pain at all"),
        ("Do you check your blood pressure at home?", "How much salt is in your diet?"),
        "Your readings are consistent with stage 1 hypertension.",
        ("start a low dose of an ACE inhibitor", "check kidney function and potassium in two weeks",
         "cut down on salt and walk thirty minutes a day"),
    ),
    "type 2 diabetes": (
        "I've been really thirsty and going to the bathroom a lot",
        ("blurry vision in the evenings", "feeling tired after meals", "a cut on my foot that heals slowly"),
        ("Does anyone in your family have diabetes?", "Have you lost weight without trying?"),
        "This pattern suggests type 2 diabetes; the HbA1c will confirm it.",
        ("order an HbA1c and a fasting glucose", "start metformin with meals if it is confirmed",
         "book a session with the diabetes educator"),
    ),
    "asthma": (
        "I get short of breath and wheezy, especially at night",
        ("a cough that wakes me up", "tightness in my chest when I run", "it gets worse around cats"),
        ("How often do you use your rescue inhaler?", "Have you ever been to the emergency room for breathing?"),
        "It sounds like your asthma is not well controlled.",
        ("add a daily inhaled steroid", "keep the rescue inhaler for sudden symptoms", "write an asthma action plan"),
    ),
    "migraine": (
        "I keep getting these pounding headaches on one side",
        ("flashing lights before the pain", "nausea during the attacks", "needing a dark quiet room"),
        ("How many headache days do you have a month?", "Do any foods or sleep changes trigger them?"),
        "These are typical migraine attacks with aura.",
        ("take a triptan at the start of an attack", "keep a headache diary",
         "avoid painkillers more than ten days a month"),
    ),
    "lower back pain": (
        "my lower back has been hurting since I lifted some boxes",
        ("stiffness in the morning", "pain when I bend forward", "no numbness in my legs"),
        ("Any trouble controlling your bladder or bowels?", "Does the pain go down either leg?"),
        "This looks like a muscular strain without signs of nerve involvement.",
        ("stay active and avoid bed rest", "use ibuprofen with food for a week", "start physiotherapy exercises"),
    ),
    "urinary tract infection": (
        "it burns when I pee and I need to go all the time",
        ("a little blood in the urine once", "pressure low in my belly", "no fever so far"),
        ("Any pain in your back or sides?", "Have you had infections like this before?"),
        "This is most likely a simple bladder infection.",
        ("send a urine sample for culture", "take a three-day course of antibiotics", "drink plenty of water"),
    ),
    "gastroesophageal reflux": (
        "I get a burning feeling in my chest after eating",
        ("a sour taste in my mouth at night", "it is worse when I lie down", "some bloating"),
        ("Does coffee or alcohol make it worse?", "Any trouble swallowing?"),
        "Your symptoms fit acid reflux.",
        ("take a proton pump inhibitor before breakfast for eight weeks", "avoid late heavy meals",
         "raise the head of the bed"),
    ),
    "seasonal allergies": (
        "my nose has been running and my eyes are itchy for weeks",
        ("lots of sneezing in the morning", "it is worse when I am outside", "no fever"),
        ("Is it worse at certain times of year?", "Do you have pets at home?"),
        "This is allergic rhinitis, probably from pollen.",
        ("use a steroid nasal spray daily", "take a non-drowsy antihistamine",
         "keep the windows closed on high-pollen days"),
    ),
    "depression": (
        "I have been feeling low and I can't enjoy anything anymore",
        ("trouble sleeping", "no energy for work", "I stopped seeing my friends"),
        ("Have you had any thoughts of harming yourself?", "How long have you felt this way?"),
        "What you describe fits a depressive episode, and it is treatable.",
        ("refer you for talking therapy", "discuss starting an antidepressant", "see you again in two weeks"),
    ),
    "anxiety": (
        "I worry all the time and my heart races",
        ("trouble falling asleep", "tense shoulders", "feeling on edge at work"),
        ("Do you have sudden attacks of panic?", "How much caffeine do you drink?"),
        "This sounds like generalized anxiety.",
        ("start cognitive behavioural therapy", "try a breathing exercise twice a day", "cut back on caffeine"),
    ),
    "hypothyroidism": (
        "I'm tired all the time and I feel cold when others don't",
        ("my skin is dry", "I gained some weight", "constipation"),
        ("Any changes in your periods or mood?", "Has anyone checked your thyroid before?"),
        "Your thyroid may be underactive; a blood test will tell us.",
        ("check TSH and free T4", "start levothyroxine if it is low", "repeat the test in six weeks"),
    ),
    "iron deficiency anemia": (
        "I get out of breath climbing stairs and I look pale",
        ("heavy periods", "feeling dizzy", "craving ice"),
        ("Have you noticed any dark stools?", "What does a usual day of eating look like?"),
        "You may have iron deficiency anemia.",
        ("check a full blood count and ferritin", "start iron tablets with orange juice",
         "look for the cause of blood loss"),
    ),
    "otitis media": (
        "my ear hurts and I feel like it is blocked",
        ("a mild fever", "muffled hearing", "I had a cold last week"),
        ("Any discharge from the ear?", "Is the pain getting better or worse?"),
        "The eardrum looks red and bulging, so this is a middle ear infection.",
        ("take pain relief regularly", "start antibiotics if it is not better in two days",
         "come back if discharge starts"),
    ),
    "community-acquired pneumonia": (
        "I've had a fever and a bad cough with green phlegm",
        ("pain on one side when I breathe in", "feeling short of breath", "shaking chills"),
        ("How high has the fever been?", "Do you smoke?"),
        "I can hear crackles on the right side; this is likely pneumonia.",
        ("get a chest X-ray", "start oral antibiotics", "come back at once if your breathing gets worse"),
    ),
    "osteoarthritis of the knee": (
        "my knee aches when I walk and it clicks",
        ("stiffness after sitting", "swelling at the end of the day", "pain on the stairs"),
        ("Did you ever injure that knee?", "How far can you walk before it hurts?"),
        "This is wear-and-tear arthritis of the knee.",
        ("strengthen the thigh muscles with physiotherapy", "use topical anti-inflammatory gel",
         "lose a little weight"),
    ),
    "gout": (
        "my big toe suddenly got red, hot and extremely painful",
        ("it started overnight", "even the bedsheet hurts", "it happened after a big dinner"),
        ("How much beer or red meat do you have?", "Are you on any water pills?"),
        "This is a typical gout attack.",
        ("take colchicine now", "check uric acid once the attack settles", "discuss long-term prevention"),
    ),
    "eczema": (
        "I have itchy dry patches on my elbows and behind my knees",
        ("it cracks and bleeds sometimes", "worse in winter", "hot showers make it worse"),
        ("Did you have this as a child?", "What soap do you use?"),
        "This is atopic eczema.",
        ("use a thick moisturizer twice a day", "apply a mild steroid cream on flares", "switch to a soap-free wash"),
    ),
    "insomnia": (
        "I can't sleep, I lie awake for hours",
        ("waking at four every morning", "feeling wrecked during the day", "using my phone in bed"),
        ("What time do you go to bed and get up?", "Do you snore or stop breathing at night?"),
        "This is chronic insomnia, and habits play a big part.",
        ("keep a fixed wake-up time", "no screens in the last hour", "try a course of CBT for insomnia"),
    ),
    "atrial fibrillation": (
        "my heart has been fluttering and beating irregularly",
        ("feeling breathless", "some lightheadedness", "it comes and goes"),
        ("Any chest pain or fainting?", "How much alcohol do you drink?"),
        "The ECG shows atrial fibrillation.",
        ("start a rate-control medicine", "discuss a blood thinner to prevent stroke", "arrange an echocardiogram"),
    ),
    "sinusitis": (
        "my face feels full and painful around my cheeks",
        ("thick nasal discharge", "pain when I bend forward", "it has lasted ten days"),
        ("Did it get better and then worse again?", "Any swelling around the eyes?"),
        "This is acute sinusitis.",
        ("use saline rinses", "take a steroid nasal spray", "start antibiotics only if it lasts beyond ten more days"),
    ),
    "irritable bowel syndrome": (
        "my stomach cramps and I swing between diarrhea and constipation",
        ("bloating after meals", "relief after a bowel movement", "worse when stressed"),
        ("Any blood in the stool or weight loss?", "Does anyone in your family have bowel cancer?"),
        "Your symptoms fit irritable bowel syndrome.",
        ("try a low-FODMAP diet with a dietitian", "take a fibre supplement", "use an antispasmodic for cramps"),
    ),
    "high cholesterol": (
        "my last blood test said my cholesterol was high",
        ("no symptoms really", "my father had a heart attack at fifty-five", "I eat a lot of fried food"),
        ("Do you exercise during the week?", "Do you smoke?"),
        "Your ten-year heart risk is raised.",
        ("start a statin", "recheck the lipids in three months", "increase fibre and reduce saturated fat"),
    ),
    "conjunctivitis": (
        "my eye is red and sticky in the mornings",
        ("a gritty feeling", "the other eye started too", "no change in my vision"),
        ("Do you wear contact lenses?", "Is there any pain looking at light?"),
        "This is infective conjunctivitis.",
        ("clean the lids with cooled boiled water", "use antibiotic drops if it is not better in three days",
         "don't share towels"),
    ),
    "plantar fasciitis": (
        "my heel hurts when I take my first steps in the morning",
        ("it eases after walking a bit", "worse after standing all day", "no injury I can remember"),
        ("What kind of shoes do you wear at work?", "Have you started running recently?"),
        "This is plantar fasciitis.",
        ("stretch the calf and the sole twice a day", "wear cushioned shoes", "use heel inserts"),
    ),
}

_DURATIONS = ("two days", "about a week", "three weeks", "a month or so", "since the spring", "a few months")
_GENERIC_QUESTIONS = (
    "How long has this been going on?",
    "On a scale of one to ten, how bad is it?",
    "Are you taking any medicines at the moment?",
    "Do you have any allergies to medicines?",
    "Does anything make it better?",
    "Has this affected your work or sleep?",
    "Have you noticed anything else unusual?",
)
_GENERIC_ANSWERS = (
    "Not that I've noticed.",
    "Maybe a six most days, sometimes an eight.",
    "Just a multivitamin.",
    "No allergies that I know of.",
    "Resting helps a little.",
    "Yes, I've missed a couple of days at work.",
    "I'm not sure, it's hard to say.",
)
_PATIENT_QUESTIONS = (
    ("Is this serious?", "It is common and usually manageable; we will keep a close eye on it."),
    ("Can I keep working?", "Yes, as long as you feel up to it; take breaks when you need them."),
    ("How long until I feel better?", "Most people notice a difference within a couple of weeks."),
    ("Are there side effects I should know about?",
     "Some people get mild stomach upset at first; call us if it persists."),
    ("Should I change my diet?", "Regular balanced meals will help; I'll give you a leaflet."),
)
_SYSTEM_PROMPTS = (
    "You are a careful primary-care physician. Ask focused questions and explain plans in plain language.",
    "You are a clinician in an outpatient clinic. Be concise and kind.",
)


def _dialogue(rng: random.Random, record_id: str) -> dict:
    condition = rng.choice(sorted(_CONDITIONS))
    complaint, symptoms, questions, assessment, plan = _CONDITIONS[condition]
    patient = f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"
    doctor = rng.choice(_DOCTORS)
    duration = rng.choice(_DURATIONS)
    messages: list[dict] = []

    def say(role: str, text: str) -> None:
        messages.append({"role": role, "content": text})

    if rng.random() < 0.1:
        say("system", rng.choice(_SYSTEM_PROMPTS))
    if rng.random() < 0.1:  # a quick question and its answer: the shortest dialogues (2 turns)
        say("user", f"Hi, quick question: {complaint} for {duration}. Should I be worried?")
        say("assistant", f"{assessment} The main step is to {plan[0]}.")
        return {"id": record_id, "messages": messages}

    if rng.random() < 0.7:  # most real consultations open with the doctor
        greeting = rng.choice(("morning", "afternoon"))
        say("assistant", f"Good {greeting}, {patient}. I'm {doctor}. What brings you in today?")
        say("user", f"Well, {complaint}. It's been going on for {duration}.")
    else:
        say("user", f"Hello {doctor}. {complaint[0].upper()}{complaint[1:]}, for {duration} now.")
    first_question = rng.choice(questions)
    say("assistant", f"I'm sorry to hear that. {first_question}")
    say("user", f"I've also had {rng.choice(symptoms)}.")

    pool = [(q, f"Not really. I have noticed {rng.choice(symptoms)}, though.")
            for q in questions if q != first_question]
    pool += list(zip(_GENERIC_QUESTIONS, _GENERIC_ANSWERS))
    rng.shuffle(pool)
    for question, answer in pool[: rng.randint(0, 9)]:
        say("assistant", question)
        say("user", answer)
        if rng.random() < 0.05:  # a doctor's follow-up sent as a separate message: two turns of the same role
            say("assistant", "Thank you, that helps.")
    steps = rng.sample(plan, rng.randint(1, len(plan)))
    say("assistant", f"{assessment} Here is the plan: we will " + ", then ".join(steps) + ".")
    for question, answer in rng.sample(_PATIENT_QUESTIONS, rng.randint(0, 2)):
        say("user", question)
        say("assistant", answer)
    if rng.random() < 0.5:  # many real transcripts end with the patient
        say("user", rng.choice(("Okay, thank you doctor.", "Thanks, that makes sense.", "Alright, see you then.")))
    else:
        say("user", "Okay.")
        say("assistant", f"Take care, {patient.split()[0]}. Book a follow-up at the front desk.")
    return {"id": record_id, "messages": messages}


def iter_dialogues(n: int, *, seed: int = 0) -> Iterator[dict]:
    """`generate_dialogues(n, seed=seed)` one dialogue at a time (constant memory, for large `n`)."""
    if n < 0:
        raise ValueError(f"generate_dialogues: n must be >= 0, got {n}")
    return (_dialogue(random.Random(f"medtee-synthetic:{seed}:{i}"), f"synthetic:{seed}:{i}") for i in range(n))


def generate_dialogues(n: int, *, seed: int = 0) -> list[dict]:
    """`n` synthetic dialogues in the chat schema, ids `synthetic:<seed>:<i>`; deterministic in (n, seed)."""
    return list(iter_dialogues(n, seed=seed))


def write_jsonl(records: Iterable[dict], path: str | os.PathLike, *, new: bool = False) -> None:
    """Write records as JSON lines, atomically: `path` keeps its old content (or stays absent) unless every record
    was written. The lines are streamed to a temporary sibling, fsynced, then renamed over `path`; with `new`, linked
    into place instead: FileExistsError when `path` exists, which is then never overwritten."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            os.fchmod(f.fileno(), 0o644)
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if new:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
