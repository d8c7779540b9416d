"""AMD certificates for SEV-SNP: pinned ARK/ASK/ASVK, VCEK/VLEK extensions, the chain, the certificate table, the cache
and (optionally) AMD's key distribution service (KDS)."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.asn1 import IA5String, decode_der
from cryptography.hazmat.primitives.serialization import Encoding

from medtee.attestation.certs import X509_ERRORS, common_name, issuer_problem, parse_certificates, serial_number
from medtee.attestation.evidence import EvidenceFormatError
from medtee.attestation.freshness import Newest
from medtee.attestation.policy import Revocation
from medtee.attestation.snp import PRODUCTS, SnpReport, Tcb
from medtee.attestation.verdict import Check, check

ROOTS = Path(__file__).resolve().parent / "roots" / "amd"
AMD_OID = "1.3.6.1.4.1.3704.1."
SPL_OIDS = {"bootloader": "3.1", "tee": "3.2", "snp": "3.3", "microcode": "3.8", "fmc": "3.9"}
CERT_TABLE_GUIDS = {
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "vcek",
    uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"): "vlek",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ask",
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ark",
}
KDS_URL = "https://kdsintf.amd.com/vcek/v1/{product}/{hwid}?{query}"
CRL_URL = "https://kdsintf.amd.com/{key}/v1/{product}/crl"  # ARK-signed: the revoked ASKs (vcek) or ASVKs (vlek)
MAX_CRL_BYTES = 1 << 20
KDS_MIN_INTERVAL_S = 10.0


@cache
def pinned(product: str, name: str) -> x509.Certificate:
    """The bundled certificate `ark`, `ask` (VCEK issuer) or `asvk` (VLEK issuer) of a product."""
    if product not in PRODUCTS:
        raise ValueError(f"unknown AMD product '{product}' (known: {', '.join(PRODUCTS)})")
    file = {"ark": f"ARK-{product}", "ask": f"SEV-{product}", "asvk": f"SEV-VLEK-{product}"}[name]
    return parse_certificates((ROOTS / f"{file}.pem").read_bytes())[0]


@cache
def _pinned_chain_ok(product: str, intermediate: str) -> str | None:
    """None when the bundled ARK is self-signed and signs the bundled ASK/ASVK; else the problem (computed once)."""
    ark, inter = pinned(product, "ark"), pinned(product, intermediate)
    problem = issuer_problem(ark, ark) or issuer_problem(inter, ark)
    return f"bundled {product} roots do not verify: {problem}" if problem else None


@dataclass(frozen=True)
class KeyCertInfo:
    """The AMD extensions of a VCEK or VLEK certificate."""

    struct_version: int | None
    product_name: str | None
    spls: dict[str, int]
    hwid: bytes | None
    csp_id: str | None

    @property
    def product(self) -> str | None:
        """'Milan' from 'Milan-B0'."""
        return self.product_name.split("-")[0] if self.product_name else None


def _ext_values(cert: x509.Certificate) -> dict[str, bytes]:
    out = {}
    for ext in cert.extensions:
        dotted = ext.oid.dotted_string
        if dotted.startswith(AMD_OID) and isinstance(ext.value, x509.UnrecognizedExtension):
            out[dotted[len(AMD_OID):]] = ext.value.value
    return out


def parse_hwid(value: bytes) -> bytes:
    """hwID as raw 64 (Milan/Genoa) or 8 (Turin) bytes, or a DER OCTET STRING holding either; raises
    EvidenceFormatError."""
    if len(value) in (8, 64):
        return value
    try:
        inner = decode_der(bytes, value)
    except ValueError:
        raise EvidenceFormatError("hwID extension is not 8 or 64 raw bytes, nor a DER OCTET STRING") from None
    if len(inner) not in (8, 64):
        raise EvidenceFormatError(f"hwID extension holds {len(inner)} bytes; expected 8 or 64")
    return inner


def _small_int(der: bytes, what: str) -> int:
    value = decode_der(int, der)
    if not 0 <= value <= 255:
        raise EvidenceFormatError(f"{what} is not a number from 0 to 255")
    return value


def key_cert_info(cert: x509.Certificate) -> KeyCertInfo:
    """Parse the AMD extensions; raises EvidenceFormatError naming a malformed one."""
    ext = _ext_values(cert)
    try:
        spls = {name: _small_int(ext[oid], f"{name}SPL") for name, oid in SPL_OIDS.items() if oid in ext}
        return KeyCertInfo(
            struct_version=_small_int(ext["1"], "structVersion") if "1" in ext else None,
            product_name=decode_der(IA5String, ext["2"]).as_str() if "2" in ext else None,
            spls=spls,
            hwid=parse_hwid(ext["4"]) if "4" in ext else None,
            csp_id=decode_der(IA5String, ext["5"]).as_str() if "5" in ext else None,
        )
    except ValueError as exc:
        raise EvidenceFormatError(f"malformed AMD extension in certificate '{common_name(cert)}': {exc}") from None


def _validity(name: str, cert: x509.Certificate, now: datetime) -> Check:
    ok = cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
    window = f"{cert.not_valid_before_utc.isoformat()}..{cert.not_valid_after_utc.isoformat()}"
    return check(f"amd.{name}.validity", ok, f"time inside {window}", now.isoformat())


def select_key_cert(certs: list[x509.Certificate], key: str) -> x509.Certificate | None:
    """The VCEK ('SEV-VCEK') or VLEK ('SEV-VLEK') among certificates."""
    wanted = "SEV-VCEK" if key == "vcek" else "SEV-VLEK"
    return next((c for c in certs if common_name(c) == wanted), None)


def chain_checks(
    report: SnpReport, leaf: x509.Certificate, others: list[x509.Certificate], now: datetime
) -> tuple[list[Check], str | None]:
    """Check ARK -> ASK/ASVK -> VCEK/VLEK, validity, pinning of supplied intermediates, and TCB/hwID/product
    consistency. Returns the checks and the product used."""
    out: list[Check] = []
    key = report.signing_key
    try:
        info = key_cert_info(leaf)
    except EvidenceFormatError as exc:
        return [check("amd.key_cert.extensions", False, "well-formed AMD extensions", exc)], None
    product = report.product or info.product
    if product is None:
        issuer = leaf.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        product = next((p for p in PRODUCTS if issuer and str(issuer[0].value).endswith(p)), None)
    out.append(check("amd.product", product in PRODUCTS, f"one of {PRODUCTS}", product))
    if product not in PRODUCTS:
        return out, None
    if report.product and info.product:
        out.append(check("amd.key_cert.product_name", info.product == report.product,
                         f"productName for {report.product}", info.product_name))
    intermediate = "asvk" if key == "vlek" else "ask"
    problem = _pinned_chain_ok(product, intermediate)
    out.append(check("amd.roots", problem is None, "bundled ARK self-signed and signing the ASK/ASVK", problem or "ok"))
    ark, inter = pinned(product, "ark"), pinned(product, intermediate)
    pinned_ders = {pinned(product, n).public_bytes(Encoding.DER) for n in ("ark", "ask", "asvk")}
    for other in others:
        if common_name(other).startswith(("ARK-", "SEV-")) and common_name(other) not in ("SEV-VCEK", "SEV-VLEK"):
            der = other.public_bytes(Encoding.DER)
            out.append(check(f"amd.supplied.{common_name(other)}", der in pinned_ders,
                             f"byte-equal to the bundled {product} certificate", "differs from the bundled one"))
    expected_cn = "SEV-VLEK" if key == "vlek" else "SEV-VCEK"
    out.append(check("amd.key_cert.kind", common_name(leaf) == expected_cn, expected_cn, common_name(leaf)))
    problem = issuer_problem(leaf, inter)
    signed = f"not issued by {common_name(inter)} ({problem})" if problem else "valid"
    out.append(check("amd.chain", signed == "valid", f"{expected_cn} signed by pinned {common_name(inter)}", signed))
    out += [_validity("ark", ark, now), _validity(intermediate, inter, now), _validity(key, leaf, now)]
    out += tcb_checks(report, info, product)
    return out, product


def tcb_checks(report: SnpReport, info: KeyCertInfo, product: str) -> list[Check]:
    """Each SPL extension equals REPORTED_TCB; hwID equals CHIP_ID unless masked (VCEK only)."""
    out = []
    tcb: Tcb = report.reported_tcb(product)
    for name, value in tcb.components().items():
        cert_value = info.spls.get(name)
        out.append(check(f"amd.key_cert.{name}_spl", cert_value == value, f"REPORTED_TCB {name}={value}", cert_value))
    if report.signing_key == "vcek":
        chip = report.chip_id_significant(product)
        if any(report.chip_id):
            actual = info.hwid.hex() if info.hwid is not None else "absent"
            out.append(check("amd.key_cert.hwid", info.hwid == chip, f"CHIP_ID {chip.hex()[:16]}...", actual[:16] + "..."))
    return out


def parse_cert_table(blob: bytes) -> dict[str, bytes]:
    """The extended-report certificate table: {GUID, offset u32, length u32}... ended by an all-zero entry; raises
    EvidenceFormatError."""
    out: dict[str, bytes] = {}
    pos = 0
    while True:
        entry = blob[pos : pos + 24]
        if len(entry) < 24:
            raise EvidenceFormatError("certificate table: missing the terminating all-zero entry")
        if not any(entry):
            return out
        guid = uuid.UUID(bytes_le=entry[:16])
        offset, length = int.from_bytes(entry[16:20], "little"), int.from_bytes(entry[20:24], "little")
        if offset + length > len(blob):
            raise EvidenceFormatError(f"certificate table: entry {guid} points past the end "
                                      f"({offset}+{length} > {len(blob)})")
        out[CERT_TABLE_GUIDS.get(guid, str(guid))] = blob[offset : offset + length]
        pos += 24


def build_cert_table(entries: dict[str, bytes]) -> bytes:
    """Inverse of parse_cert_table for the known names (tests and the file provider)."""
    by_name = {v: k for k, v in CERT_TABLE_GUIDS.items()}
    header_len = 24 * (len(entries) + 1)
    header, body = b"", b""
    for name, data in entries.items():
        header += by_name[name].bytes_le + (header_len + len(body)).to_bytes(4, "little") + len(data).to_bytes(4, "little")
        body += data
    return header + bytes(24) + body


class CertCache:
    """A local directory of VCEKs/VLEKs: `<dir>/<Product>/vcek/<hwid hex>/<reported tcb hex>.der` and
    `<dir>/<Product>/vlek/*.der` (tried in turn). Optionally filled from AMD's KDS (VCEK only, rate-limited)."""

    _lock = threading.Lock()
    _last_fetch = 0.0

    def __init__(self, directory: str | Path | None, *, allow_network: bool = False, timeout_s: float = 10.0):
        self.directory = Path(directory).expanduser() if directory else None
        self.allow_network = allow_network
        self.timeout_s = timeout_s

    def _vcek_path(self, product: str, report: SnpReport) -> Path | None:
        if self.directory is None:
            return None
        hwid = report.chip_id_significant(product).hex()
        return self.directory / product / "vcek" / hwid / f"{report.reported_tcb_raw.hex()}.der"

    def candidates(self, report: SnpReport, product: str | None) -> list[bytes]:
        """Certificates from the cache (and KDS when allowed) that may have signed the report."""
        products = [product] if product else list(PRODUCTS)
        found: list[bytes] = []
        for prod in products:
            if report.signing_key == "vcek":
                path = self._vcek_path(prod, report)
                if path is not None and path.is_file():
                    found.append(path.read_bytes())
            elif self.directory is not None and (self.directory / prod / "vlek").is_dir():
                found += [p.read_bytes() for p in sorted((self.directory / prod / "vlek").iterdir()) if p.is_file()]
        if not found and self.allow_network and report.signing_key == "vcek" and product and any(report.chip_id):
            fetched = self.fetch_vcek(product, report)
            if fetched:
                found.append(fetched)
        return found

    def put_vcek(self, product: str, report: SnpReport, der: bytes) -> Path | None:
        """Store a VCEK (temp sibling then rename)."""
        path = self._vcek_path(product, report)
        if path is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(der)
        tmp.replace(path)
        return path

    @staticmethod
    def kds_url(product: str, report: SnpReport) -> str:
        """The KDS VCEK URL for this chip and REPORTED_TCB."""
        tcb = report.reported_tcb(product)
        params = {"blSPL": tcb.bootloader, "teeSPL": tcb.tee, "snpSPL": tcb.snp, "ucodeSPL": tcb.microcode}
        if tcb.fmc is not None:
            params["fmcSPL"] = tcb.fmc
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return KDS_URL.format(product=product, hwid=report.chip_id_significant(product).hex(), query=query)

    def fetch_vcek(self, product: str, report: SnpReport) -> bytes | None:
        """Fetch a VCEK from KDS (at most one request per 10 s in this process) and cache it; None on failure."""
        import urllib.request

        with CertCache._lock:
            wait = CertCache._last_fetch + KDS_MIN_INTERVAL_S - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            CertCache._last_fetch = time.monotonic()
            try:
                with urllib.request.urlopen(self.kds_url(product, report), timeout=self.timeout_s) as resp:  # noqa: S310
                    der = resp.read()
            except OSError:
                return None
        self.put_vcek(product, report, der)
        return der


def crl_path(cache_dir: str | Path, product: str, key: str) -> Path:
    """Where the operator keeps AMD's CRL for a product's VCEK (`key`="vcek") or VLEK chain: `<dir>/<Product>/crl/
    <key>.der`, the DER file CRL_URL serves, refreshed outside the TEE (appraisal never fetches it)."""
    return Path(cache_dir).expanduser() / product / "crl" / f"{key}.der"


def _cert_kind(product: str, cert: x509.Certificate) -> str:
    """The rollback record's name for an AMD certificate a CRL can list."""
    return f"amd-cert/{product}/{common_name(cert)}/{serial_number(cert):x}"


def _crl_status(cache_dir: str | None, product: str, key: str, certs: list[x509.Certificate],
                now: datetime, newest: Newest | None) -> tuple[bool | None, str]:
    """(revoked, why) from the cached CRL: True when a genuine CRL lists one of `certs` (inside its window or not),
    or `newest` refuses (a certificate a CRL accepted before listed, whatever the cache holds now; a CRL older than
    the newest accepted; a damaged record: each fails under every stance), False when it is genuine, current and
    lists none, None when that cannot be established."""
    from medtee.files import NotRegularFile, read_regular

    recorded = certs[:1] if newest else []  # the ASK/ASVK the ARK issued (every VCEK/VLEK has serial 0: not one's own)
    for c in recorded:
        if why := newest.standing(_cert_kind(product, c)):
            return True, f"{common_name(c)}: {why}"
    if not cache_dir:
        return None, "no cert_cache_dir to hold AMD's CRL"
    path = crl_path(cache_dir, product, key)
    try:
        data = read_regular(path, MAX_CRL_BYTES)
        load = x509.load_pem_x509_crl if data.lstrip().startswith(b"-----BEGIN") else x509.load_der_x509_crl
        crl = load(data)  # KDS serves DER; a PEM copy (openssl crl -outform PEM) is the same CRL
        ark = pinned(product, "ark")
        signed = crl.issuer == ark.subject and crl.is_signature_valid(ark.public_key())
    except FileNotFoundError:
        return None, f"no CRL at {path} (fetch {CRL_URL.format(key=key, product=product)} outside the TEE)"
    except NotRegularFile as exc:
        return None, f"CRL {path} {exc}"
    except (OSError, *X509_ERRORS) as exc:
        return None, f"CRL {path} unusable ({type(exc).__name__})"
    if not signed:
        return None, f"CRL {path} is not signed by the pinned ARK-{product}"
    listed = [c for c in certs if crl.get_revoked_certificate_by_serial_number(serial_number(c)) is not None]
    if listed:  # genuine: final, whatever its window
        for c in set(listed) & set(recorded):
            newest.admit(_cert_kind(product, c), crl.last_update_utc, revokes=True)
        return True, f"revoked by AMD: {', '.join(common_name(c) for c in listed)}"
    if crl.next_update_utc is None or not crl.last_update_utc <= now <= crl.next_update_utc:
        window = f"{crl.last_update_utc.isoformat()}..{crl.next_update_utc.isoformat() if crl.next_update_utc else '?'}"
        return None, f"CRL {path} not current (valid {window}; refresh it)"
    if newest and (why := newest.admit(f"amd-crl/{product}/{key}", crl.last_update_utc, _crl_number(crl))):
        return True, f"CRL {path} {why}"
    return False, f"none of {', '.join(common_name(c) for c in certs)} listed (CRL of {crl.last_update_utc.date()})"


def _crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except (x509.ExtensionNotFound, *X509_ERRORS):  # then its date alone orders it
        return None


def revocation_check(product: str | None, key: str, key_cert: x509.Certificate | None, cache_dir: str | None,
                     stance: Revocation, now: datetime, newest: Newest | None = None) -> Check:
    """AMD's revocation of the ASK/ASVK (and the VCEK/VLEK) that vouch for the report, from the cached CRL: revoked
    (also: a CRL `newest` refuses, see `_crl_status`) fails under every stance, not established fails under
    fail_closed and warns under fail_open."""
    expected = f"not revoked in AMD's CRL ({stance.value})"
    if product not in PRODUCTS:
        return check("amd.revocation", False, expected, "no known product to find its CRL")
    certs = [pinned(product, "asvk" if key == "vlek" else "ask"), *([key_cert] if key_cert is not None else [])]
    revoked, why = _crl_status(cache_dir, product, key, certs, now, newest)
    if revoked is None and stance is Revocation.fail_open:
        return check("amd.revocation", True, expected, f"WARNING, not established (fail-open): {why}")
    return check("amd.revocation", revoked is False, expected, why)

