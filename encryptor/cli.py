"""`kmskeys encrypt / inspect / bundle`: the build side's commands, loaded by the front door.

Each entry point takes the arguments after the subcommand and returns an exit code. Failures are
one line on stderr with a distinct exit code (encryptor.errors), never a traceback or a secret.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from encryptor.errors import EXIT_INPUT, EXIT_KMS, EXIT_OK, EncryptorError, UsageError
from kmskeys.contract import CALLOUT_MAX, DEFAULT_PREFIX, USER_PAYLOAD_MAX
from kmskeys.errors import InvalidNameError, KmsKeysError
from kmskeys.names import validate_prefix

KEY_ID_ENV = "KMSKEYS_KEY_ID"
DEBUG_ENV = "KMSKEYS_DEBUG"


def encrypt_main(argv: Sequence[str] | None = None) -> int:
    """`kmskeys encrypt NAME --key-id KEY | --to TARGET`: read a secret from stdin or --input,
    print its blob (a `kms:` blob, or a token blob for `token:NAME`)."""
    parser = argparse.ArgumentParser(
        prog="kmskeys encrypt",
        description="Encrypt a secret (stdin, or --input FILE) into a blob bound to NAME. The "
        "secret is taken byte for byte: `printf %s` avoids a trailing newline.",
    )
    parser.add_argument(
        "name", metavar="NAME", help="the secret's name, requested as PREFIX:NAME (kms:NAME)"
    )
    _key_options(parser)
    parser.add_argument(
        "--to",
        metavar="TARGET",
        help="instead of KMS: a token blob for a host's PKCS#11 token (token:NAME), encrypted "
        "with its public key alone: pkcs11:token=LABEL;object=KEY?module-path=MODULE, or a PEM "
        "public key FILE exported from the token (docs/tokens.md)",
    )
    parser.add_argument("--input", metavar="FILE", default="-", help="read the secret from FILE")
    parser.add_argument("--output", metavar="FILE", type=Path, help="write the blob to FILE")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--envelope",
        action="store_true",
        help="always use envelope mode (automatic above 4096 bytes)",
    )
    modes.add_argument(
        "--raw",
        action="store_true",
        help="legacy: bare base64 KMS ciphertext with no context (interoperability only)",
    )
    _aws_options(parser)
    return _run(parser, argv, _encrypt)


def inspect_main(argv: Sequence[str] | None = None) -> int:
    """`kmskeys inspect [NAME] [BLOB | FILE | -]`: describe a blob without decrypting it."""
    parser = argparse.ArgumentParser(
        prog="kmskeys inspect",
        description="Describe a blob (version, mode, bindings, expiry, key, size). Never decrypts "
        "and never calls AWS. With NAME (and --user, --unit), also check that the blob was made "
        "for that name (and user, and unit), as the resolver does before it asks KMS: exit 3 if "
        "not.",
    )
    parser.add_argument(
        "first",
        metavar="NAME",
        nargs="?",
        help="the name the blob is deployed under (BLOB_DIR/NAME.kms, or requested as "
        "PREFIX:NAME); with a single argument, that argument is the blob",
    )
    parser.add_argument(
        "second",
        metavar="BLOB|FILE|-",
        nargs="?",
        help="the blob text, a file holding it, or - for stdin (the default)",
    )
    parser.add_argument(
        "--user", metavar="USER", help="also check the host user a user-bound blob is bound to"
    )
    parser.add_argument(
        "--unit", metavar="UNIT", help="also check the systemd unit a unit-bound blob is bound to"
    )
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    parser.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        help="the description prefix the host's resolver serves, as the apps pass it (default: "
        "%(default)s); the text says which description the blob answers to",
    )
    return _run(parser, argv, _inspect)


def bundle_main(argv: Sequence[str] | None = None) -> int:
    """`kmskeys bundle ENVFILE --key-id KEY --output-dir DIR`: one blob file per secret."""
    parser = argparse.ArgumentParser(
        prog="kmskeys bundle",
        description="Encrypt every KEY=VALUE of an env file into DIR/KEY.kms (mode 0644, atomic). "
        "A bad line fails the whole bundle before anything is written.",
    )
    parser.add_argument("envfile", metavar="ENVFILE", help="the env file, or - for stdin")
    parser.add_argument(
        "--output-dir", metavar="DIR", type=Path, required=True, help="where NAME.kms files go"
    )
    _key_options(parser)
    _aws_options(parser)
    return _run(parser, argv, _bundle)


def create_key_main(argv: Sequence[str] | None = None) -> int:
    """`kmskeys create-key --alias alias/NAME`: a symmetric key and its alias; print its ARN."""
    parser = argparse.ArgumentParser(
        prog="kmskeys create-key",
        description="Create a symmetric ENCRYPT_DECRYPT KMS key named by ALIAS and print its ARN "
        "(for a test KMS or a sandbox account off EC2; production keys come from terraform/). "
        "An existing ALIAS is not moved: the ARN of the key it names is printed, nothing created.",
    )
    parser.add_argument("--alias", metavar="alias/NAME", required=True, help="the key's alias")
    parser.add_argument(
        "--description", default="kmskeys secrets", help="the key's description (%(default)s)"
    )
    _aws_options(parser)
    return _run(parser, argv, _create_key)


def _create_key(args: argparse.Namespace) -> int:
    from encryptor.keys import check_alias, create_key
    from encryptor.kms import make_client

    alias = check_alias(args.alias)
    arn, created = create_key(make_client(**_aws(args)), alias, args.description)
    said = f"created {arn} as {alias}" if created else f"{alias} names {arn}: nothing created"
    print(f"kmskeys create-key: {said}", file=sys.stderr)
    print(arn)
    return EXIT_OK


def _key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key-id",
        metavar="KEY",
        default=os.environ.get(KEY_ID_ENV) or None,
        help=f"KMS key id, ARN, alias/NAME or alias ARN (default: ${KEY_ID_ENV})",
    )
    parser.add_argument("--user", metavar="USER", help="bind to this host user (DPAPI user scope)")
    parser.add_argument(
        "--unit",
        metavar="UNIT",
        help="bind to this systemd unit (nginx.service): only a requester the resolver finds in "
        "it, from its cgroup, gets the secret",
    )
    parser.add_argument(
        "--not-after", metavar="WHEN", help="expiry: ISO 8601 (2030-01-31T00:00:00Z) or +30d, +12h"
    )
    parser.add_argument(
        "--context",
        metavar="K=V",
        action="append",
        default=[],
        help="extra authenticated context entry (repeatable)",
    )


def _aws_options(parser: argparse.ArgumentParser) -> None:
    aws = parser.add_argument_group("AWS (defaults: the usual AWS environment and config files)")
    aws.add_argument("--region", help="AWS region (default: $AWS_REGION, then the profile)")
    aws.add_argument("--profile", help="AWS profile (default: $AWS_PROFILE)")
    aws.add_argument(
        "--endpoint-url", metavar="URL", help="KMS endpoint (default: $AWS_ENDPOINT_URL)"
    )


def _run(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    command: Callable[[argparse.Namespace], int],
) -> int:
    try:
        # Intermixed: `inspect NAME --json FILE` keeps both positionals.
        args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exit_:  # --help, or a usage error argparse already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_INPUT
    try:
        return command(args)
    except EncryptorError as exc:
        return _fail(parser.prog, str(exc), exc.exit_code)
    except KmsKeysError as exc:  # a blob or name the shared kmskeys checks refused
        return _fail(parser.prog, str(exc), EXIT_INPUT)
    except KeyboardInterrupt:
        return _fail(parser.prog, "interrupted", 130)
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        # Only the type: an unexpected message could quote data we were handed.
        return _fail(
            parser.prog,
            f"unexpected {type(exc).__name__}; set {DEBUG_ENV}=1 for a traceback",
            EXIT_KMS,
        )


def _fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: {' '.join(message.split())}", file=sys.stderr)
    return code


def _aws(args: argparse.Namespace) -> dict[str, Any]:
    return {"region": args.region, "profile": args.profile, "endpoint_url": args.endpoint_url}


def _require_key_id(args: argparse.Namespace) -> str:
    if not args.key_id:
        raise UsageError(f"--key-id is required (or set {KEY_ID_ENV})")
    key_id: str = args.key_id
    return key_id


def _encrypt(args: argparse.Namespace) -> int:
    from encryptor.encryption import (
        TOO_BIG,
        encrypt,
        encrypt_raw,
        parse_context_option,
    )
    from encryptor.files import read_bounded
    from kmskeys.names import validate_name

    if args.to is not None:
        from encryptor.tokenencrypt import encrypt_command

        return encrypt_command(args, _emit)
    key_id = _require_key_id(args)
    validate_name(args.name)
    if args.raw and (args.user or args.unit or args.not_after or args.context):
        raise UsageError(
            "--raw makes an unbound legacy blob: no --user, --unit, --not-after or --context"
        )
    context = parse_context_option(args.context)
    if args.input == "-" and sys.stdin.isatty():
        print("reading the secret from stdin; end it with Ctrl-D", file=sys.stderr)
    plaintext = read_bounded(args.input, USER_PAYLOAD_MAX, "the secret", TOO_BIG)
    if args.raw:
        blob = encrypt_raw(plaintext, key_id, **_aws(args))
        print("note: --raw blobs are legacy: not bound to any name or user", file=sys.stderr)
    else:
        blob = encrypt(
            plaintext,
            args.name,
            key_id,
            user=args.user,
            unit=args.unit,
            not_after=args.not_after,
            context=context,
            envelope=True if args.envelope else None,
            **_aws(args),
        )
    del plaintext
    text = blob.to_text()
    if len(text) > CALLOUT_MAX:
        print(
            f"note: this blob is {len(text)} characters, over the {CALLOUT_MAX}-byte request-key "
            f"callout info limit: deploy it as the file BLOB_DIR/{args.name}.kms on the host "
            "instead of passing it as callout info",
            file=sys.stderr,
        )
    return _emit(args, text)


def _emit(args: argparse.Namespace, text: str) -> int:
    """Write the blob's text to --output (atomically) or stdout."""
    from encryptor.files import write_atomic

    if args.output is not None:
        write_atomic(args.output, (text + "\n").encode("ascii"))
    else:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    from encryptor.inspection import check, describe, read_text, rows
    from kmskeys.blob import parse_blob
    from kmskeys.names import validate_name
    from kmskeys.tokenblob import is_token_blob

    name, source = (None, args.first) if args.second is None else (args.first, args.second)
    try:
        prefix = validate_prefix(args.prefix)
    except InvalidNameError as exc:
        raise UsageError(f"--prefix: {exc}") from None
    if name is not None:
        name = validate_name(name)
    text = read_text(source or "-")
    if is_token_blob(text):
        from encryptor.tokenencrypt import inspect_command

        return inspect_command(args, text, name, prefix)
    blob = parse_blob(text, allow_legacy=True)
    # A blob made for another name, user or unit: refused here as the resolver refuses it.
    checked = check(blob, name, args.user, args.unit)
    description = describe(blob, checked)
    if args.json:
        print(json.dumps(description, indent=2, sort_keys=True))
        return EXIT_OK
    for label, value in rows(blob, description, prefix, name):
        print(f"{label:<10} {value}")
    return EXIT_OK


def _bundle(args: argparse.Namespace) -> int:
    from encryptor.bundle import MAX_ENVFILE, bundle
    from encryptor.encryption import parse_context_option
    from encryptor.files import read_bounded

    key_id = _require_key_id(args)
    context = parse_context_option(args.context)
    data = read_bounded(args.envfile, MAX_ENVFILE, "the env file")
    results = bundle(
        data,
        key_id,
        args.output_dir,
        user=args.user,
        unit=args.unit,
        not_after=args.not_after,
        context=context,
        **_aws(args),
    )
    header = ("NAME", "BYTES", "MODE", "BLOB", "KEY")
    rows = [(r.name, str(r.size), r.mode, str(len(r.blob.to_text())), r.key_arn) for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:<{widths[2]}}  "
            f"{row[3]:>{widths[3]}}  {row[4]}"
        )
    print(f"wrote {len(results)} blob file(s) to {args.output_dir}", file=sys.stderr)
    return EXIT_OK
