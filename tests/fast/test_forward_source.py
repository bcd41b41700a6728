from torch import nn

from loralab.fast.forward_source import forward_body


class Documented(nn.Module):
    def forward(self, x):
        """A docstring is not code."""
        y = x * 2
        return y + 1


class OtherArguments(nn.Module):
    def forward(self, x, mask):
        return x


def test_forward_body_is_the_normalised_statements_without_the_docstring():
    assert forward_body(Documented, ("self", "x")) == "y = x * 2\nreturn y + 1"


def test_forward_body_is_none_for_other_arguments_or_unreadable_source():
    assert forward_body(OtherArguments, ("self", "x")) is None
    assert forward_body(nn.Linear, ("self", "input")) is not None  # torch's own source reads fine
    unreadable = type("Unreadable", (nn.Module,), {"forward": eval("lambda self, x: x")})
    assert forward_body(unreadable, ("self", "x")) is None
