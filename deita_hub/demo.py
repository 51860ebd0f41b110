"""A deterministic synthetic pool for the demo recipe: varied topics, tasks and lengths, with synthetic scores.

Nothing here is real data and the scores are not model scores: they follow a simple, documented rule (longer,
multi-step tasks score as more complex; answers that cover the question score as better) plus seeded noise, so
that the pipeline's behaviour is visible. Some rows are near-duplicates of others (same template, same topic) so
the diversity filter has something to reject. The demo card says all of this.
"""

from __future__ import annotations

import random

TOPICS = [
    "photosynthesis",
    "binary search",
    "the French Revolution",
    "compound interest",
    "plate tectonics",
    "recursion in Python",
    "the water cycle",
    "supply and demand",
    "vaccines",
    "black holes",
    "SQL joins",
    "climate change",
    "the Pythagorean theorem",
    "neural networks",
    "sourdough baking",
    "marathon training",
    "the Roman Empire",
    "HTTP caching",
    "git rebase",
    "sleep hygiene",
    "prime numbers",
    "renewable energy",
    "the immune system",
    "impressionist painting",
    "Bayes' theorem",
    "container shipping",
    "coral reefs",
    "public speaking",
    "linked lists",
    "the printing press",
    "inflation",
    "volcanoes",
    "unit testing",
    "meditation",
    "quantum entanglement",
    "the Silk Road",
    "gradient descent",
    "bird migration",
    "contract law basics",
    "jazz improvisation",
]
TASKS = [
    ("Explain {t} in simple terms.", 1),
    ("What is {t}?", 1),
    ("Give me three key facts about {t}.", 2),
    ("Write a short poem about {t}.", 2),
    ("Compare {t} with {u}, listing similarities and differences.", 3),
    ("Design a one-week lesson plan that teaches {t} to high-school students, with daily goals.", 4),
    ("Write a step-by-step guide to {t} for a beginner, then list common mistakes.", 3),
    ("Critically evaluate the main arguments around {t}, citing trade-offs and open questions.", 5),
    ("Create a quiz of five questions on {t} with answers and explanations.", 4),
    ("Summarize {t} in one sentence.", 1),
]
OPENERS = ["Sure.", "Here is an overview.", "Good question.", "Let's break it down.", "Certainly!"]
FILLER = [
    "It connects to {u} in a useful way.",
    "A common misconception is that it is simple, but the details matter.",
    "Historically, understanding of {t} developed over many years.",
    "In practice, people apply {t} when they need reliable results.",
    "One example: consider how {t} shows up in everyday life.",
    "The key idea is to reason about causes and effects carefully.",
    "Experts often disagree about edge cases of {t}.",
    "To go further, study how {t} interacts with {u}.",
]
FOLLOW_UPS = ["Can you give an example?", "How does that relate to {u}?", "Can you make it shorter?"]
SYSTEM_PROMPTS = ["You are a concise tutor.", "You are a friendly assistant who explains with examples."]


def _answer(rng: random.Random, topic: str, other: str, sentences: int) -> str:
    parts = [rng.choice(OPENERS)]
    parts += [rng.choice(FILLER).format(t=topic, u=other) for _ in range(sentences)]
    return " ".join(parts)


def generate_pool(rows: int = 2400, seed: int = 0) -> list[dict]:
    """ShareGPT rows with `id`, `source`, `conversations`, `complexity_scores`, `quality_scores`."""
    rng = random.Random(seed)
    pool = []
    for i in range(rows):
        topic, other = rng.sample(TOPICS, 2)
        template, difficulty = rng.choice(TASKS)
        question = template.format(t=topic, u=other)
        turns_wanted = 1 + (rng.random() < 0.25) + (rng.random() < 0.1)
        conversations, complexity, quality = [], [], []
        if rng.random() < 0.1:
            conversations.append({"from": "system", "value": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(turns_wanted):
            sentences = max(1, int(rng.gauss(difficulty * 1.5, 1.5)))
            answer = _answer(rng, topic, other, sentences)
            conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            # Synthetic scores on Deita's 1..6 scale: complexity from the task, quality from the answer's coverage.
            complexity.append(round(min(6.0, max(1.0, 1.0 + difficulty + rng.gauss(0, 0.6))), 4))
            quality.append(round(min(6.0, max(1.0, 1.5 + 0.5 * min(sentences, 8) + rng.gauss(0, 0.6))), 4))
            question = rng.choice(FOLLOW_UPS).format(u=other)
        pool.append(
            {
                "id": f"demo-{i:05d}",
                "source": "deita-hub synthetic demo",
                "conversations": conversations,
                "complexity_scores": complexity,
                "quality_scores": quality,
            }
        )
    return pool
