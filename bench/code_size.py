"""
How much there is to read: lines, code lines, characters per line and long lines of the library, scripts and tasks.

    python -m bench.code_size                # nanochat/ scripts/ tasks/
    python -m bench.code_size tests bench    # any folders

Code lines are lines holding a Python token other than a comment or a docstring (a string that is a statement of
its own); blank lines, comments and docstrings are counted apart. Characters per line and the share of lines over
100 characters are over non-blank lines.
"""

import glob
import io
import os
import sys
import tokenize

SKIP = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER,
        tokenize.ENCODING)

def code_lines(src):
    """Line numbers holding code: every token's lines except comments and statement-alone strings (docstrings)."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type not in (tokenize.COMMENT,
                                                                                                tokenize.NL)]
    lines = set()
    for i, t in enumerate(tokens):
        if t.type in SKIP:
            continue
        before = tokens[i - 1].type if i else tokenize.NEWLINE
        after = tokens[i + 1].type if i + 1 < len(tokens) else tokenize.NEWLINE
        if t.type == tokenize.STRING and before in SKIP and after in SKIP:
            continue
        lines.update(range(t.start[0], t.end[0] + 1))
    return lines

def main(folders):
    rows = []
    for folder in folders:
        files = sorted(glob.glob(os.path.join(folder, "**", "*.py"), recursive=True))
        texts = [open(f, encoding="utf-8").read() for f in files]
        lines = [line for text in texts for line in text.splitlines()]
        nonblank = [line for line in lines if line.strip()]
        code = sum(len(code_lines(text)) for text in texts)
        rows.append((folder, len(files), len(lines), code, sum(map(len, nonblank)), len(nonblank),
                     sum(len(line) > 100 for line in nonblank)))
    total = ("total", *[sum(r[i] for r in rows) for i in range(1, 7)])
    print(f"{'folder':<10} {'files':>5} {'lines':>7} {'code':>7} {'chars/line':>10} {'> 100 chars':>11}")
    for name, files, lines, code, chars, nonblank, long_lines in rows + [total]:
        print(f"{name:<10} {files:>5} {lines:>7,} {code:>7,} {chars / max(nonblank, 1):>10.1f} "
              f"{100 * long_lines / max(nonblank, 1):>10.1f}%")

if __name__ == "__main__":
    main(sys.argv[1:] or ["nanochat", "scripts", "tasks"])
