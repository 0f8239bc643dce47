"""``img``: qemu-img, with explicit formats and JSON output."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from blockctl import _images
from blockctl._cli.common import Command, ExitCode, emit, global_options
from blockctl._cli.progress import ProgressDisplay
from blockctl.errors import ConfigError
from blockctl.types import ImageFormat, coerce_enum, parse_size


class ProgressBar:
    """A qemu-img run's progress (it reports percent): a line on stderr (never with --json)."""

    def __init__(self, args: argparse.Namespace, label: str) -> None:
        self.display = ProgressDisplay(enabled=not args.json)
        self.label = label

    def __call__(self, percent: float) -> None:
        self.display.update(self.label, self.label, percent, 100.0, unit="%")

    def done(self) -> None:
        self.display.finish(self.label)


class Img(Command):
    name = "img"
    help = "qemu-img, with explicit formats and JSON output: info, check, commit, rebase, ..."

    def configure(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        p = sub.add_parser(
            "info",
            parents=[global_options(parent=False)],
            help="image info (--chain: with backing files)",
        )
        p.add_argument("image", type=Path)
        p.add_argument("-f", "--format", required=True)
        p.add_argument("--chain", action="store_true")
        p.add_argument("--untrusted", action="store_true", help="under CPU and memory limits")
        p = sub.add_parser(
            "check",
            parents=[global_options(parent=False)],
            help="consistency check (exit 4: corrupt)",
        )
        p.add_argument("image", type=Path)
        p.add_argument("-f", "--format", required=True)
        p = sub.add_parser(
            "create",
            parents=[global_options(parent=False)],
            help="create an image (a backing file needs -F)",
        )
        p.add_argument("image", type=Path)
        p.add_argument("size", nargs="?")
        p.add_argument("-f", "--format", required=True)
        p.add_argument("-b", "--backing", type=Path)
        p.add_argument("-F", "--backing-format")
        p = sub.add_parser(
            "commit",
            parents=[global_options(parent=False)],
            help="merge an image into its backing file (offline)",
        )
        p.add_argument("image", type=Path)
        p.add_argument("-f", "--format", required=True)
        p.add_argument("-b", "--base", type=Path)
        p.add_argument("-d", "--drop", action="store_true", help="leave the image as it is")
        p = sub.add_parser(
            "rebase",
            parents=[global_options(parent=False)],
            help="point an image at another backing file",
        )
        p.add_argument("image", type=Path)
        p.add_argument("-f", "--format", required=True)
        p.add_argument("-b", "--backing", type=Path, help="omit to flatten")
        p.add_argument("-F", "--backing-format")
        p.add_argument("-u", "--unsafe", action="store_true", help="rewrite the header only")
        p = sub.add_parser(
            "convert",
            parents=[global_options(parent=False)],
            help="copy an image into another format",
        )
        p.add_argument("source", type=Path)
        p.add_argument("target", type=Path)
        p.add_argument("-f", "--format", required=True)
        p.add_argument("-O", "--output-format", required=True)
        p.add_argument("-c", "--compress", action="store_true")
        p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE")
        p = sub.add_parser(
            "resize",
            parents=[global_options(parent=False)],
            help="change the virtual size (--shrink to make smaller)",
        )
        p.add_argument("image", type=Path)
        p.add_argument("size")
        p.add_argument("-f", "--format", required=True)
        p.add_argument("--shrink", action="store_true")
        p = sub.add_parser(
            "snapshot",
            parents=[global_options(parent=False)],
            help="internal snapshots of a qcow2: list/create/apply/delete",
        )
        p.add_argument("image", type=Path)
        p.add_argument("snapshot_action", choices=["list", "create", "apply", "delete"])
        p.add_argument("tag", nargs="?")
        p = sub.add_parser(
            "compare",
            parents=[global_options(parent=False)],
            help="whether two images read the same (exit 4: differ)",
        )
        p.add_argument("first", type=Path)
        p.add_argument("second", type=Path)
        p.add_argument("-f", "--format", required=True)
        p.add_argument("-F", "--second-format", required=True)
        p.add_argument("-s", "--strict", action="store_true")
        p = sub.add_parser("map", parents=[global_options(parent=False)], help="allocation map")
        p.add_argument("image", type=Path)
        p.add_argument("-f", "--format", required=True)
        p = sub.add_parser(
            "measure", parents=[global_options(parent=False)], help="space a new image needs"
        )
        p.add_argument("-O", "--output-format", required=True)
        p.add_argument("--size")
        p.add_argument("--image", type=Path)
        p.add_argument("-f", "--format")

    async def run(self, args: argparse.Namespace) -> int:
        def fmt(value: str | None, where: str = "format") -> ImageFormat:
            return coerce_enum(ImageFormat, value, where)

        bar = ProgressBar(args, args.action)
        data: Any
        human = ""
        code = 0
        if args.action == "info":
            infos = await _images.info(
                args.image, fmt(args.format), backing_chain=args.chain, untrusted=args.untrusted
            )
            data = [dataclasses.asdict(i) for i in infos]
            human = "\n".join(
                f"{i.filename}: {i.format}, {i.virtual_size} bytes"
                + (
                    f", backing {i.backing_filename} ({i.backing_format})"
                    if i.backing_filename
                    else ""
                )
                for i in infos
            )
        elif args.action == "check":
            result = await _images.check(args.image, fmt(args.format))
            data = dataclasses.asdict(result)
            human = (
                "no errors"
                if result.clean
                else f"corrupt: {result.corruptions}"
                if result.corrupt
                else f"leaked clusters: {result.leaks}; check errors: {result.check_errors}"
            )
            code = ExitCode.DIFFERENT if result.corrupt else ExitCode.OK
        elif args.action == "create":
            backing_fmt = (
                None if args.backing_format is None else fmt(args.backing_format, "backing_format")
            )
            size = None if args.size is None else parse_size(args.size)
            await _images.create(
                args.image,
                fmt(args.format),
                size=size,
                backing=args.backing,
                backing_format=backing_fmt,
            )
            data, human = {"image": str(args.image)}, f"created {args.image}"
        elif args.action == "commit":
            await _images.commit(
                args.image, fmt(args.format), base=args.base, drop=args.drop, progress=bar
            )
            data, human = {"committed": str(args.image)}, f"committed {args.image}"
        elif args.action == "rebase":
            backing_fmt = (
                None if args.backing_format is None else fmt(args.backing_format, "backing_format")
            )
            await _images.rebase(
                args.image,
                fmt(args.format),
                args.backing,
                backing_fmt,
                unsafe=args.unsafe,
                progress=bar,
            )
            data, human = {"rebased": str(args.image)}, f"rebased {args.image}"
        elif args.action == "convert":
            options = {}
            for option in args.option:
                key, eq, value = option.partition("=")
                if not eq or not key or not value:
                    raise ConfigError(
                        "option",
                        f"-o {option!r}: needs KEY=VALUE (e.g. -o cluster_size=64k, "
                        "-o lazy_refcounts=on); nothing was converted",
                    )
                options[key] = value
            await _images.convert(
                args.source,
                fmt(args.format),
                args.target,
                fmt(args.output_format, "output_format"),
                compress=args.compress,
                options=options,
                progress=bar,
            )
            data, human = {"target": str(args.target)}, f"wrote {args.target}"
        elif args.action == "resize":
            await _images.resize(
                args.image, fmt(args.format), parse_size(args.size), shrink=args.shrink
            )
            data, human = {"resized": str(args.image)}, f"resized {args.image}"
        elif args.action == "snapshot":
            snaps = await _images.snapshot(args.image, args.snapshot_action, args.tag)
            data = [dataclasses.asdict(s) for s in snaps]
            human = "\n".join(f"{s.id:>4} {s.name}" for s in snaps) or "no snapshots"
        elif args.action == "compare":
            same = await _images.compare(
                args.first,
                fmt(args.format),
                args.second,
                fmt(args.second_format, "second_format"),
                strict=args.strict,
            )
            data, human = {"identical": same}, "identical" if same else "different"
            code = ExitCode.OK if same else ExitCode.DIFFERENT
        elif args.action == "map":
            extents = await _images.map_extents(args.image, fmt(args.format))
            data = [dataclasses.asdict(e) for e in extents]
            human = "\n".join(
                f"{e.start:>14} {e.length:>14} depth={e.depth} "
                f"{'data' if e.data else 'zero' if e.zero else 'hole'}"
                for e in extents
            )
        else:
            image = None if args.image is None else (args.image, fmt(args.format))
            size = None if args.size is None else parse_size(args.size)
            needed = await _images.measure(
                fmt(args.output_format, "output_format"), size=size, image=image
            )
            data = dataclasses.asdict(needed)
            human = f"required {needed.required}, fully allocated {needed.fully_allocated}"
        bar.done()
        emit(args, data, human)
        return code
