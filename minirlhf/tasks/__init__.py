"""Toy tasks. Each task module offers `sample_review`-style generators, `make_datasets`,
`write_datasets` and `gold_reward(texts) -> list[float]` in [0, 1]."""
from minirlhf.tasks import arithmetic, reviews

TASKS = {"reviews": reviews, "arithmetic": arithmetic, "arithmetic_lenient": arithmetic.LENIENT}


def get_task(name="reviews"):
    """The task module called `name`; an unknown name lists the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
