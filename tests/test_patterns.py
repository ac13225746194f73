import pytest

from nmcompile.errors import UserError
from nmcompile.patterns import Pattern, parse_pattern


@pytest.mark.parametrize("text,expected", [("2:4", (2, 4)), ("1:4", (1, 4)), ("4:8", (4, 8)), ("2:8", (2, 8)), ("8:16", (8, 16)), ("16:32", (16, 32)), ("31:32", (31, 32)), (" 2:4 ", (2, 4))])
def test_valid_patterns(text, expected):
    assert parse_pattern(text) == Pattern(*expected)


@pytest.mark.parametrize("text", ["5:4", "0:4", "4:4", "x", "2:4:8", "-2:4", "2:", ":4", "2/4", "2:64", "", "2.0:4"])
def test_invalid_patterns(text):
    with pytest.raises(UserError):
        parse_pattern(text)


def test_none_means_no_pruning():
    assert parse_pattern("none") is None
