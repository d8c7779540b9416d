"""The SEV-SNP ATTESTATION_REPORT: layout, parsing, must-be-zero fields and the report signature.

Offsets follow AMD's SEV-SNP firmware ABI (doc 56860), table "ATTESTATION_REPORT Structure".
The same code reads real and simulated reports.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from medtee.attestation.evidence import EvidenceFormatError
from medtee.attestation.verdict import Check, check

REPORT_SIZE = 0x4A0
SIGNED_END = 0x2A0  # the signature covers bytes 0x000-0x29F
SIG_R, SIG_S, SIG_COMPONENT = 0x2A0, 0x2E8, 72
P384_BYTES = 48
SUPPORTED_VERSIONS = (2, 3, 4, 5)

# POLICY bits
POLICY_SMT = 1 << 16
POLICY_RESERVED_ONE = 1 << 17
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
POLICY_SINGLE_SOCKET = 1 << 20
POLICY_MBZ = ~((1 << 26) - 1) & 0xFFFFFFFFFFFFFFFF  # bits 63:26

SIGNING_KEYS = {0: "vcek", 1: "vlek", 7: "none"}

# Products by CPUID family/model (v3+ reports).
_PRODUCTS = (
    (0x19, range(0x00, 0x10), "Milan"),
    (0x19, range(0x10, 0x20), "Genoa"),
    (0x19, range(0xA0, 0xB0), "Genoa"),
    (0x1A, range(0x00, 0x12), "Turin"),
)
PRODUCTS = ("Milan", "Genoa", "Turin")


#: PLATFORM_INFO bits (SEV-SNP ABI, ATTESTATION_REPORT offset 0x40) a policy can require set, by name: TSME, ECC
#: memory, RAPL disabled (the power side channel), ciphertext hiding, the memory alias check done (BadRAM) and SEV-TIO.
#: (Bit 0, SMT enabled, is what `allow_smt: false` rules out through the guest policy.)
PLATFORM_FLAGS = {"smt": 0, "tsme": 1, "ecc": 2, "rapl_disabled": 3, "ciphertext_hiding": 4,
                  "alias_check_complete": 5, "sev_tio": 7}


@dataclass(frozen=True)
class Tcb:
    """A TCB_VERSION decoded for a product (Turin: FMC, bootloader, TEE, SNP, -, -, -, microcode)."""

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def decode(cls, raw: bytes, product: str) -> Tcb:
        """Decode 8 TCB bytes with the product's layout."""
        if product == "Turin":
            return cls(fmc=raw[0], bootloader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7])
        return cls(bootloader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])

    def reserved_ok(self, raw: bytes, product: str) -> bool:
        """Whether the reserved bytes of this product's layout are zero."""
        return not any(raw[4:7] if product == "Turin" else raw[2:6])

    def components(self) -> dict[str, int]:
        """Named components (fmc only on Turin)."""
        out = {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp, "microcode": self.microcode}
        if self.fmc is not None:
            out["fmc"] = self.fmc
        return out

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.components().items())


class ReportFormatError(EvidenceFormatError):
    """The bytes are not an SEV-SNP attestation report."""


@dataclass(frozen=True)
class SnpReport:
    """A parsed report; integer fields are decoded, byte fields kept raw."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb_raw: bytes
    platform_info: int
    key_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb_raw: bytes
    cpuid_family: int
    cpuid_model: int
    cpuid_stepping: int
    chip_id: bytes
    committed_tcb_raw: bytes
    current_firmware: tuple[int, int, int]  # (major, minor, build)
    committed_firmware: tuple[int, int, int]
    launch_tcb_raw: bytes

    @classmethod
    def parse(cls, raw: bytes) -> SnpReport:
        """Parse 1184 bytes; raises ReportFormatError on a wrong size."""
        if len(raw) != REPORT_SIZE:
            raise ReportFormatError(f"an SEV-SNP report is {REPORT_SIZE} bytes; this one has {len(raw)}")
        u32 = lambda o: struct.unpack_from("<I", raw, o)[0]  # noqa: E731
        u64 = lambda o: struct.unpack_from("<Q", raw, o)[0]  # noqa: E731
        version = u32(0x000)
        has_cpuid = version >= 3
        return cls(
            raw=bytes(raw),
            version=version,
            guest_svn=u32(0x004),
            policy=u64(0x008),
            family_id=raw[0x010:0x020],
            image_id=raw[0x020:0x030],
            vmpl=u32(0x030),
            signature_algo=u32(0x034),
            current_tcb_raw=raw[0x038:0x040],
            platform_info=u64(0x040),
            key_info=u32(0x048),
            report_data=raw[0x050:0x090],
            measurement=raw[0x090:0x0C0],
            host_data=raw[0x0C0:0x0E0],
            id_key_digest=raw[0x0E0:0x110],
            author_key_digest=raw[0x110:0x140],
            report_id=raw[0x140:0x160],
            report_id_ma=raw[0x160:0x180],
            reported_tcb_raw=raw[0x180:0x188],
            cpuid_family=raw[0x188] if has_cpuid else 0,
            cpuid_model=raw[0x189] if has_cpuid else 0,
            cpuid_stepping=raw[0x18A] if has_cpuid else 0,
            chip_id=raw[0x1A0:0x1E0],
            committed_tcb_raw=raw[0x1E0:0x1E8],
            current_firmware=(raw[0x1EA], raw[0x1E9], raw[0x1E8]),
            committed_firmware=(raw[0x1EE], raw[0x1ED], raw[0x1EC]),
            launch_tcb_raw=raw[0x1F0:0x1F8],
        )

    @property
    def product(self) -> str | None:
        """Milan/Genoa/Turin from CPUID (v3+); None for v2 reports (take it from the VCEK)."""
        for family, models, name in _PRODUCTS:
            if self.cpuid_family == family and self.cpuid_model in models:
                return name
        return None

    @property
    def signing_key(self) -> str:
        """'vcek', 'vlek', 'none' or 'reserved(n)' from KEY_INFO bits 4:2."""
        code = (self.key_info >> 2) & 0x7
        return SIGNING_KEYS.get(code, f"reserved({code})")

    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)

    @property
    def migrate_ma(self) -> bool:
        return bool(self.policy & POLICY_MIGRATE_MA)

    @property
    def smt_allowed(self) -> bool:
        return bool(self.policy & POLICY_SMT)

    @property
    def single_socket(self) -> bool:
        return bool(self.policy & POLICY_SINGLE_SOCKET)

    def platform_flags(self) -> list[str]:
        """The PLATFORM_INFO flags the host reports set, by name (PLATFORM_FLAGS)."""
        return [name for name, bit in PLATFORM_FLAGS.items() if self.platform_info >> bit & 1]

    def reported_tcb(self, product: str) -> Tcb:
        return Tcb.decode(self.reported_tcb_raw, product)

    def chip_id_significant(self, product: str) -> bytes:
        """The part of CHIP_ID that identifies the chip (first 8 bytes on Turin)."""
        return self.chip_id[:8] if product == "Turin" else self.chip_id

    def digest(self) -> str:
        return "sha384:" + hashlib.sha384(self.raw).hexdigest()


def _zero(raw: bytes, start: int, end: int) -> tuple[bool, str]:
    region = raw[start:end]
    nonzero = [start + i for i, b in enumerate(region) if b]
    return (not nonzero, "all zero" if not nonzero else f"non-zero byte(s) at {', '.join(hex(o) for o in nonzero[:4])}")


def structure_checks(report: SnpReport, product: str | None) -> list[Check]:
    """Version, algorithm, key info, policy must-be-one/zero bits and every reserved region, including the unsigned tail."""
    raw = report.raw
    out = [
        check("snp.version", report.version in SUPPORTED_VERSIONS, f"one of {SUPPORTED_VERSIONS}", report.version),
        check("snp.signature_algo", report.signature_algo == 1, "1 (ECDSA P-384 with SHA-384)", report.signature_algo),
        check("snp.key_info.reserved", report.key_info & ~0x1F == 0, "bits 31:5 zero", hex(report.key_info)),
        check("snp.key_info.mask_chip_key", not report.key_info & 0x2, "0 (report signed)", report.key_info >> 1 & 1),
        check("snp.signing_key", report.signing_key in ("vcek", "vlek"), "vcek or vlek", report.signing_key),
        check("snp.policy.reserved_one", bool(report.policy & POLICY_RESERVED_ONE), "bit 17 set", hex(report.policy)),
        check("snp.policy.mbz", not report.policy & POLICY_MBZ, "bits 63:26 zero", hex(report.policy)),
    ]
    regions = [(0x04C, 0x050), (0x1EB, 0x1EC), (0x1EF, 0x1F0), (0x330, REPORT_SIZE)]
    regions.append((0x18B, 0x1A0) if report.version >= 3 else (0x188, 0x1A0))
    regions.append((0x208, SIGNED_END) if report.version >= 5 else (0x1F8, SIGNED_END))
    regions += [(SIG_R + P384_BYTES, SIG_R + SIG_COMPONENT), (SIG_S + P384_BYTES, SIG_S + SIG_COMPONENT)]
    for start, end in regions:
        ok, actual = _zero(raw, start, end)
        out.append(check(f"snp.reserved[{start:#05x}:{end:#05x}]", ok, "all zero", actual))
    if product == "Turin":
        ok, actual = _zero(raw, 0x1A8, 0x1E0)
        out.append(check("snp.chip_id.turin_tail", ok, "all zero after the 8-byte Turin CHIP_ID", actual))
    if product is not None:
        for label, tcb_raw in (("current", report.current_tcb_raw), ("reported", report.reported_tcb_raw),
                               ("committed", report.committed_tcb_raw), ("launch", report.launch_tcb_raw)):
            ok = Tcb.decode(tcb_raw, product).reserved_ok(tcb_raw, product)
            out.append(check(f"snp.tcb.{label}.reserved", ok, f"reserved {product} TCB bytes zero", tcb_raw.hex()))
    return out


def signature_of(report: SnpReport) -> bytes:
    """The report signature as DER (r and s are little-endian in the report)."""
    r = int.from_bytes(report.raw[SIG_R : SIG_R + SIG_COMPONENT], "little")
    s = int.from_bytes(report.raw[SIG_S : SIG_S + SIG_COMPONENT], "little")
    return encode_dss_signature(r, s)


def signature_check(report: SnpReport, public_key: object, signer: str) -> Check:
    """ECDSA P-384/SHA-384 over bytes 0x000-0x29F with the VCEK/VLEK (or development) key."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp384r1":
        return check("snp.signature", False, f"a P-384 key in the {signer}", "another key type")
    try:
        public_key.verify(signature_of(report), report.raw[:SIGNED_END], ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        return check("snp.signature", False, f"valid ECDSA P-384 signature by the {signer}", "invalid signature")
    return check("snp.signature", True, f"valid ECDSA P-384 signature by the {signer}", "valid")


def sign_report(body: bytes, private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """Fill the signature of a report body (first 0x2A0 bytes used) and return the 1184-byte report; for dev and tests."""
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    head = bytes(body[:SIGNED_END]).ljust(SIGNED_END, b"\0")
    r, s = decode_dss_signature(private_key.sign(head, ec.ECDSA(hashes.SHA384())))
    sig = r.to_bytes(SIG_COMPONENT, "little") + s.to_bytes(SIG_COMPONENT, "little")
    return (head + sig).ljust(REPORT_SIZE, b"\0")
