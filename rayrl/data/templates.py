"""The paper's prompt templates (appendix A.3, table 3) and prompt rendering."""

from __future__ import annotations

from typing import Any

_LOGIC_EXAMPLE = (
    '{"header": ["Position", "Nationality", "Job"], '
    '"rows": [["1", "british", "plumber"], ["2", "polish", "carpenter"]]}'
)

TEMPLATES = {
    "math": (
        "You are a knowledgeable math assistant. Answer the following questions and think step by step\n"
        "{question}\nPlease output the final answer within \\boxed{{}}."
    ),
    "code": (
        "Write a complete, self-contained Python solution to the following problem. Your solution "
        "must include all necessary imports and the full function definition, including the "
        "signature exactly as specified. Do not modify the function signature or docstring.\n{question}"
    ),
    "logic": (
        "Solve the following puzzle\n{question}\nPlease return the final answer in <answer> </answer> "
        "tags, for example <answer> "
        + _LOGIC_EXAMPLE.replace("{", "{{").replace("}", "}}")
        + " </answer>."
    ),
    "stem": (
        "You are a knowledgeable assistant. Answer the following questions and think step by step \n "
        "{question} \n put your final answer option within \\boxed{{}}. Only put the letter in the "
        "box, e.g. \\boxed{{A}}. There is only one correct answer"
    ),
}
# Guru spells some abilities differently from the table's domain names.
ALIASES = {"codegen": "code", "logical_reasoning": "logic", "science": "stem"}


def apply_template(ability: str, question: str) -> str:
    """The domain instruction around `question`, as the paper prompts it."""
    domain = ALIASES.get(ability, ability)
    if domain not in TEMPLATES:
        raise KeyError(f"no prompt template for ability {ability!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[domain].format(question=question)


def render_prompt(row: dict, tokenizer: Any) -> str:
    """The text the policy sees: the chat template when the tokenizer has one, else the
    message contents joined (the tiny ladder's character tokenizer has no chat template)."""
    messages = row["prompt"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)
