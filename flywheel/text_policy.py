"""The one policy for characters in text, applied by the one reader of each format.

Text that reaches a tokenizer must be text a person could have typed or pasted. Three
classes of code point are not, and each has reached training shards before (NUL bytes,
raw or as JSON's `\\u0000`, passed every filter into the shards, the reference texts and
the BPE vocabulary):

- C0 control characters (U+0000 to U+001F) other than tab, line feed and carriage return;
- lone surrogates (U+D800 to U+DFFF: in a Python string every surrogate is lone, a valid
  pair having been decoded to one code point), which UTF-8 cannot even store;
- non-characters (U+FDD0 to U+FDEF and the last two code points of every plane), which
  Unicode reserves for a program's internal use, never for interchange.

A record holding one is rejected with the reason and the first offending code point, never
repaired: removing characters would change what the record says without anyone seeing it,
and a reject is counted in the manifest by reason like any other. Readers call
`text_problem` on every string that becomes text (the data stage's documents, the SFT
stage's prompts, responses and turns, the monitor's window records).
"""

from __future__ import annotations

import re

# Reasons, as the rejects file and the manifest count them.
CONTROL_CHARACTER = "control_character"
INVALID_UNICODE = "invalid_unicode"  # a lone surrogate
NONCHARACTER = "noncharacter"

# Tab, line feed and carriage return are how text is laid out; the rest of C0 is not text.
ALLOWED_CONTROLS = "\t\n\r"
_CONTROLS = "".join(chr(c) for c in range(0x20) if chr(c) not in ALLOWED_CONTROLS)
_NONCHARACTERS = [chr(c) for c in range(0xFDD0, 0xFDF0)] + [
    chr(plane * 0x10000 + low) for plane in range(17) for low in (0xFFFE, 0xFFFF)
]
_SURROGATES = (0xD800, 0xDFFF)
# One character class, searched in C: the check costs a scan of the text and no more.
_DISALLOWED = re.compile(
    "["
    + re.escape(_CONTROLS)
    + f"{chr(_SURROGATES[0])}-{chr(_SURROGATES[1])}"
    + "".join(map(re.escape, _NONCHARACTERS))
    + "]"
)


def text_problem(text: str) -> tuple[str, str] | None:
    """(reason, detail) for the first code point the policy refuses in `text`, or None."""
    found = _DISALLOWED.search(text)
    if found is None:
        return None
    code = ord(found.group())
    if code < 0x20:
        reason = CONTROL_CHARACTER
    elif _SURROGATES[0] <= code <= _SURROGATES[1]:
        reason = INVALID_UNICODE
    else:
        reason = NONCHARACTER
    return reason, f"U+{code:04X} at character {found.start()}"
