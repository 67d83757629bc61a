"""bench.code_size counts code lines the way a reader would: not comments, blank lines or docstrings."""

from bench.code_size import code_lines

def test_code_lines_skip_comments_blank_lines_and_docstrings():
    src = '''"""Module docstring,
over two lines."""

import os  # a comment after code counts

def f(x):
    """One-line docstring."""
    # a comment alone
    s = """a string that is
assigned is code"""
    return x + len(s)
'''
    assert sorted(code_lines(src)) == [4, 6, 9, 10, 11]
