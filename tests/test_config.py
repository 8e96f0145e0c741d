"""Options and config files: a mistake in them is a one-line UserError naming the file or option."""
import pytest

from rpo_engine.config import build_parser


def test_help_says_grpo_epsilon_high_follows_epsilon():
    text = " ".join(build_parser().format_help().split())  # argparse wraps the help text
    assert "--epsilon-high EPSILON_HIGH upper clip range (default: grpo the same as --epsilon, dapo 0.28)" in text
