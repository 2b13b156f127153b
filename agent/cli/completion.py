"""`deploy-agent completion bash|zsh`: a completion script generated from the argparse tree.

Generated, so that a new subcommand or flag completes without anyone editing a script. Where a
command takes a deployment id, the script asks the agent (`ls -q`) for the recent ones.
"""

from __future__ import annotations

import argparse
import shlex

from agent.cli.exits import EXIT_OK

# Commands whose positional is a deployment id, completed from `deploy-agent ls -q`.
_TAKES_ID = frozenset({"show", "logs", "kill", "rm", "rollback"})
# Options that take a value: the word after them is not the subcommand.
_VALUED_GLOBALS = ("--url", "--token")


def print_completion(args: argparse.Namespace) -> int:
    from agent.cli.parser import build_parser  # the parser names this module's handler

    script = bash_script(build_parser())
    if args.shell == "zsh":
        script = "#compdef deploy-agent\nautoload -U +X bashcompinit && bashcompinit\n" + script
    print(script, end="")
    return EXIT_OK


def bash_script(parser: argparse.ArgumentParser) -> str:
    commands = _subcommands(parser)
    cases = []
    for name, subparser in commands.items():
        words = " ".join(_options(subparser) + [choice for action in subparser._actions for choice in _choices(action)])
        ids = ' $(deploy-agent ls -q --limit 100 2>/dev/null)' if name in _TAKES_ID else ""
        cases.append(f'    {shlex.quote(name)}) words="{words}{ids}" ;;')
    top = " ".join([*commands, *_options(parser)])
    valued = "|".join(_VALUED_GLOBALS)
    return "\n".join(
        [
            "# deploy-agent completion for bash (eval \"$(deploy-agent completion bash)\")",
            "_deploy_agent() {",
            '  local cur="${COMP_WORDS[COMP_CWORD]}" command="" words="" i',
            "  for ((i = 1; i < COMP_CWORD; i++)); do",
            '    case "${COMP_WORDS[i]}" in',
            f"      {valued}) ((i++)) ;;",
            "      -*) ;;",
            '      *) command="${COMP_WORDS[i]}"; break ;;',
            "    esac",
            "  done",
            '  case "$command" in',
            f'    "") words="{top}" ;;',
            *cases,
            "  esac",
            '  COMPREPLY=($(compgen -W "$words" -- "$cur"))',
            "}",
            "complete -o default -F _deploy_agent deploy-agent",
            "",
        ]
    )


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings if option.startswith("--")]


def _choices(action: argparse.Action) -> list[str]:
    """The fixed words a positional accepts (`bash`/`zsh`, `check`)."""
    if action.option_strings or not action.choices or isinstance(action, argparse._SubParsersAction):
        return []
    return [str(choice) for choice in action.choices]
