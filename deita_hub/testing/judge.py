"""Test support for the judged benchmarks: the tiny rating judge and its server, from the library.

`save_rating_judge_model` (deita_hub.tiny) writes a tiny LLaMA whose greedy reply is "[[d]]"; `JudgeServer`
(deita_hub.evaluation.local_judge) serves it with `transformers serve`. `save_digit_answering_model` (a bare digit,
no brackets) is the judge whose ratings cannot be parsed.
"""

from deita_hub.evaluation.local_judge import JudgeServer
from deita_hub.tiny import save_rating_judge_model

__all__ = ["JudgeServer", "save_rating_judge_model"]
