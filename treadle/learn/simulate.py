"""A simulated user population for the learning-loop demonstration: people who ask short factual questions of a
deployment and rate the answers by a preference they never state.

Deliberately independent of the learner (it imports nothing from treadle): it talks to the deployment only
through the `openai` client and gives feedback only through `POST /v1/feedback`, as a real product would.

The hidden preference: an answer should finish on its own in at most `max_words` words. A cut-off answer
scores 0, a finished one 1 if short enough, else `max_words / words`. Users who got less than 1 sometimes
(`correction_rate`) write the answer they wanted: a short, correct one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import random

import httpx
from openai import OpenAI

# (question, the short answer a user would write as a correction)
QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "Paris."),
    ("What is the capital of Japan?", "Tokyo."),
    ("What is the capital of Italy?", "Rome."),
    ("What is the capital of Spain?", "Madrid."),
    ("What is the capital of Germany?", "Berlin."),
    ("What is the capital of Canada?", "Ottawa."),
    ("How many legs does a spider have?", "Eight."),
    ("How many days are in a week?", "Seven."),
    ("How many continents are there?", "Seven."),
    ("What is 7 times 8?", "56."),
    ("What is 12 plus 30?", "42."),
    ("What is the square root of 81?", "9."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci."),
    ("What is the largest planet in our solar system?", "Jupiter."),
    ("Which planet is known as the Red Planet?", "Mars."),
    ("What gas do plants absorb from the air?", "Carbon dioxide."),
    ("What is the boiling point of water in Celsius?", "100 degrees Celsius."),
    ("What is the freezing point of water in Celsius?", "0 degrees Celsius."),
    ("What color is the sky on a clear day?", "Blue."),
    ("What is the chemical symbol for water?", "H2O."),
    ("What is the chemical symbol for gold?", "Au."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean."),
    ("What is the tallest mountain in the world?", "Mount Everest."),
    ("How many hours are in a day?", "24."),
    ("What language is spoken in Brazil?", "Portuguese."),
    ("What is the fastest land animal?", "The cheetah."),
    ("What do bees make?", "Honey."),
    ("What is the opposite of hot?", "Cold."),
    ("How many sides does a triangle have?", "Three."),
    ("What is the main ingredient of guacamole?", "Avocado."),
    ("Which animal is known as the king of the jungle?", "The lion."),
    ("What is the currency of the United Kingdom?", "The pound sterling."),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong."),
    ("What organ pumps blood through the body?", "The heart."),
    ("What is the smallest prime number?", "2."),
    ("In which country are the pyramids of Giza?", "Egypt."),
    ("What is the longest river in Africa?", "The Nile."),
    ("How many minutes are in an hour?", "Sixty."),
    ("What is frozen water called?", "Ice."),
)


@dataclasses.dataclass(frozen=True)
class Interaction:
    user: str
    question: str
    answer: str
    finish_reason: str
    words: int
    reward: float
    corrected: bool
    completion_id: str
    version: int  # from the X-Treadle-Deployment-Version response header


def hidden_reward(answer: str, finish_reason: str, max_words: int) -> float:
    """The preference the users never state: finish on your own, in at most `max_words` words."""
    if finish_reason != "stop":
        return 0.0
    words = len(answer.split())
    if words == 0:
        return 0.0
    return 1.0 if words <= max_words else max_words / words


class UserPopulation:
    """`n_users` people asking questions from `QUESTIONS`; `round(n)` serves n requests concurrently and rates each."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        deployment: str,
        *,
        seed: int = 0,
        n_users: int = 8,
        max_words: int = 12,
        correction_rate: float = 0.5,
        max_tokens: int = 40,
        temperature: float = 0.7,
        concurrency: int = 8,
    ) -> None:
        base = base_url.rstrip("/")
        self.openai = OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0, timeout=600)
        self.http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {api_key}"}, timeout=60)
        self.deployment = deployment
        self.rng = random.Random(seed)
        self.users = [f"user-{seed}-{i}" for i in range(n_users)]
        self.max_words = max_words
        self.correction_rate = correction_rate
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.concurrency = concurrency

    def close(self) -> None:
        self.http.close()
        self.openai.close()

    def _one(self, user: str, item: tuple[str, str], seed: int, correct: bool) -> Interaction:
        question, wanted = item
        raw = self.openai.chat.completions.with_raw_response.create(
            model=self.deployment,
            messages=[{"role": "user", "content": question}],
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            seed=seed,
            user=user,
            extra_body={"session_id": f"{user}-{seed}"},
        )
        resp = raw.parse()
        choice = resp.choices[0]
        answer = choice.message.content or ""
        reward = hidden_reward(answer, str(choice.finish_reason), self.max_words)
        feedback: dict[str, object] = {
            "completion_id": resp.id,
            "reward": reward,
            "idempotency_key": f"sim-{resp.id}",
        }
        corrected = correct and reward < 1.0
        if corrected:
            feedback["correction"] = wanted
        r = self.http.post("/v1/feedback", json=feedback)
        r.raise_for_status()
        return Interaction(
            user=user,
            question=question,
            answer=answer,
            finish_reason=str(choice.finish_reason),
            words=len(answer.split()),
            reward=reward,
            corrected=corrected,
            completion_id=resp.id,
            version=int(raw.headers.get("X-Treadle-Deployment-Version", "0")),
        )

    def round(self, n_requests: int) -> list[Interaction]:
        """n requests from random users about random questions, served concurrently, each rated."""
        jobs = [
            (
                self.rng.choice(self.users),
                self.rng.choice(QUESTIONS),
                self.rng.randrange(2**31),
                self.rng.random() < self.correction_rate,
            )
            for _ in range(n_requests)
        ]
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda job: self._one(*job), jobs))


def mean_reward(interactions: list[Interaction]) -> float:
    return sum(i.reward for i in interactions) / len(interactions) if interactions else 0.0
