"""argparse parsers built from the command table (:mod:`fusepool.cli.table`)."""

import argparse
import importlib

from fusepool import __version__
from fusepool.cli.table import COMMANDS, Command


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"fusepool: error: {message} (see `{self.prog} --help`)\n")


class Handler:
    """A command's handler, imported when called (``args.func(args)``): only the
    module of the command being run is loaded."""

    def __init__(self, command: Command):
        self.command = command

    def resolve(self):
        module, name = self.command.handler.split(":")
        return getattr(importlib.import_module(f"fusepool.cli.{module}"), name)

    def __call__(self, args):
        return self.resolve()(args)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, just that command's sub-parser.

    Building all ~25 sub-parsers costs ~20 ms (argparse looks up a translation
    for every help string), a fifth of a short command's run time.
    """
    p = Parser(prog="fusepool", description="A thin pool in user space: dm-thin style thin volumes "
               "and snapshots as sparse files in a FUSE mount.")
    p.add_argument("--version", action="version", version=f"fusepool {__version__}")
    p.add_argument("--debug", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    p.commands = sub.choices  # name -> sub-parser, of those built
    for command in COMMANDS:
        if only is not None and command.name != only:
            continue
        sp = sub.add_parser(command.name, help=command.help, description=command.help)
        if command.epilog:
            sp.formatter_class = argparse.RawDescriptionHelpFormatter
            sp.epilog = command.epilog
        sp.set_defaults(func=Handler(command))
        groups = {}
        for arg in command.args:
            if arg.exclusive and arg.exclusive not in groups:
                groups[arg.exclusive] = sp.add_mutually_exclusive_group()
            (groups[arg.exclusive] if arg.exclusive else sp).add_argument(*arg.flags, **arg.options)
    return p
