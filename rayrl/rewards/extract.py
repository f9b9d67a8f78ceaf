"""Answer extraction shared by the verifiers: the text after </think>, the last box, the last tag.

All scans are linear and non-recursive so that megabyte outputs and 10,000-deep nesting stay cheap.
"""

from __future__ import annotations

BOX_COMMANDS = ("\\boxed", "\\fbox")


def final_text(response: str) -> str:
    """The part of a response after its reasoning: everything after the last </think>."""
    cut = response.rfind("</think>")
    return response if cut < 0 else response[cut + len("</think>") :]


def braced(text: str, start: int) -> str | None:
    """The content of the {...} group opening at text[start], or None if it never closes."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # \{ and \} are literal braces, not grouping
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} (also `\\boxed 5`), None if there is none."""
    start = max(text.rfind(cmd) for cmd in BOX_COMMANDS)
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        return braced(text, i)
    # `\boxed 5`: the argument runs to the next space or dollar sign
    end = i
    while end < len(text) and text[end] not in " $\n":
        end += 1
    return text[i:end] if end > i else None


def last_tag(text: str, tag: str) -> str | None:
    """Content of the last <tag>...</tag>, None if there is no closed one."""
    start = text.rfind(f"<{tag}>")
    if start < 0:
        return None
    end = text.find(f"</{tag}>", start)
    return None if end < 0 else text[start + len(tag) + 2 : end]
