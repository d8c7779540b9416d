"""`medtee image measure`: the expected SEV-SNP launch measurement of a confidential VM image, optionally pinned in
a release policy file (then `medtee broker policy add NAME FILE`).

Exit 0 measured (and pinned); 2 bad input, one line naming the flag or file and the fix, before anything is hashed.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from medtee import exits

_HEX = re.compile(r"(0[xX])?[0-9a-fA-F]{1,16}")


def _image(args: argparse.Namespace):
    """The Image the flags describe; ValueError for a malformed number."""
    from medtee.image.measure import Image

    if not _HEX.fullmatch(args.guest_features):
        raise ValueError(f"--guest-features '{args.guest_features}' is not hex (1-16 hex digits, e.g. 0x1)")
    if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", args.vcpus):  # a negative one is refused by its range in check_image
        raise ValueError(f"--vcpus '{args.vcpus}' is not a whole number")
    return Image(ovmf=Path(args.ovmf), kernel=Path(args.kernel), initrd=Path(args.initrd), append=args.append,
                 vcpus=int(args.vcpus), vcpu_type=args.vcpu_type, guest_features=int(args.guest_features, 16),
                 vmm_type=args.vmm_type, ovmf_hash=args.snp_ovmf_hash)


def _measure(args: argparse.Namespace) -> int:
    import json

    from medtee.image.measure import check_image, launch_measurement, pin_measurement, read_policy_file

    try:
        image = _image(args)
        check_image(image)
        if args.into:
            read_policy_file(Path(args.into))
        measurement = launch_measurement(image)
        added = pin_measurement(Path(args.into), measurement) if args.into else None
    except ValueError as e:
        return exits.fail(str(e).splitlines()[0])
    if args.json:
        print(json.dumps({"measurement": measurement, "vmm_type": image.vmm_type, "vcpus": image.vcpus,
                          "vcpu_type": image.vcpu_type, "guest_features": f"{image.guest_features:#x}",
                          "into": args.into, "added": added}))
    else:
        print(measurement)
    if args.into:
        exits.say(f"{'pinned' if added else 'already pinned'}: {measurement} in {args.into}; store it with "
                  f"`medtee broker policy add NAME {args.into}`")
    return exits.OK


def add_parser(subparsers) -> None:
    """Register `image measure` on the `medtee` subparsers."""
    image = subparsers.add_parser("image", help="confidential VM images: expected SEV-SNP launch measurements")
    sub = image.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    m = sub.add_parser("measure", help="compute an image's expected SEV-SNP MEASUREMENT (sev-snp-measure)",
                       description="Direct kernel boot with kernel hashes (QEMU kernel-hashes=on): the measurement "
                                   "covers OVMF, SHA-256 of the kernel, initrd and command line, and the vCPUs' "
                                   "initial state. Prints 96 hex characters.")
    m.add_argument("--ovmf", required=True, metavar="FILE", help="OVMF firmware (edk2 AmdSevX64 build)")
    m.add_argument("--kernel", required=True, metavar="FILE", help="the kernel the VMM boots")
    m.add_argument("--initrd", required=True, metavar="FILE", help="the initrd the VMM boots")
    m.add_argument("--append", required=True, metavar="CMDLINE",
                   help="the kernel command line, byte for byte as the VMM passes it (dm-verity root hash included)")
    m.add_argument("--vcpus", required=True, metavar="N", help="number of vCPUs")
    m.add_argument("--vcpu-type", metavar="TYPE",
                   help="QEMU -cpu model, e.g. EPYC-v4, EPYC-Milan, EPYC-Genoa (needed with qemu; ec2 and gce set "
                        "their own)")
    m.add_argument("--guest-features", default="0x1", metavar="HEX",
                   help="SEV_FEATURES the VMM enables (default 0x1: SNP active)")
    m.add_argument("--vmm-type", default="qemu", metavar="qemu|ec2|gce", help="the VMM (default qemu)")
    m.add_argument("--snp-ovmf-hash", metavar="HEX",
                   help="SNP hash of the OVMF pages computed earlier (sev-snp-measure --mode snp:ovmf-hash); "
                        "the OVMF file's footer table is still read")
    m.add_argument("--into", metavar="POLICY_FILE",
                   help="add the measurement to this policy file's allowed measurements (kept valid, atomic)")
    m.add_argument("--json", action="store_true", help="print a JSON object instead of the bare measurement")
    m.set_defaults(handler=_measure)
