"""Appraisal policies: the schema of the `attestation` config group and its YAML files in conf/attestation/; the
one reader of policy files and resolver of `--policy NAME|FILE` (`read_policy_file`, `resolve_policy`)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from medtee.paths import conf_dir

#: A policy name: the file stem of a shipped policy or of one in a broker's store.
POLICY_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")
MAX_POLICY_FILE_BYTES = 64 << 10  # of a policy YAML file
#: A GPU board as NVIDIA names its VBIOS RIMs: PROJECT-PROJECT_SKU-CHIP_SKU (upper case, from the signed evidence).
GPU_BOARD = re.compile(r"[0-9A-Z]{1,16}-[0-9A-Z]{1,16}-[0-9A-Z]{1,16}")
_FIELDS_DOC = "the fields and their types: AttestationPolicy in medtee/attestation/policy.py"


class Provider(str, Enum):
    """CPU evidence providers. YAML names the member (`sev_snp`); evidence and the wire carry the value."""

    simulated = "simulated"  # development only: no TEE, protects nothing
    sev_snp = "sev-snp"  # the SEV-SNP guest's own report (configfs-tsm or /dev/sev-guest)
    file = "file"  # evidence read from a file (verification of recorded evidence)


class GpuProvider(str, Enum):
    """GPU evidence providers."""

    nvidia = "nvidia"  # NVIDIA confidential-computing GPUs through NVML


class Revocation(str, Enum):
    """What to do when certificate revocation (a GPU's OCSP answers, AMD's CRL) cannot be established."""

    fail_closed = "fail_closed"  # no fresh revocation answer (cached) -> reject
    fail_open = "fail_open"  # no answer -> accept; a "revoked" answer still rejects
    off = "off"  # do not check revocation


@dataclass
class MinimumTcb:
    """Minimum SVN per TCB component; compared component by component against REPORTED_TCB."""

    bootloader: int = 0  # minimum bootloader SPL
    tee: int = 0  # minimum PSP OS (TEE) SPL
    snp: int = 0  # minimum SNP firmware SPL
    microcode: int = 0  # minimum CPU microcode SPL
    fmc: int = 0  # minimum FMC SPL (Turin only; ignored on Milan/Genoa)


@dataclass
class GpuPolicy:
    """Requirements on each NVIDIA GPU's evidence (used when `gpu_provider` is set or GPU evidence is present)."""

    required: bool = False  # reject CPU evidence that comes without any GPU evidence
    require_cc_mode: bool = True  # NVML must report confidential computing on
    forbid_devtools: bool = True  # NVML must report developer-tools mode off (devtools has no memory protection)
    min_driver_version: str = "0"  # minimum driver version, dotted (e.g. "550.90.07")
    min_vbios_version: str = "0"  # minimum VBIOS version, dotted hex pairs as reported (e.g. "96.00.9F.00.01")
    rim_store: Optional[str] = None  # directory of signed RIMs (*.swidtag) and the pinned RIM root (rim_root.pem)
    require_rim_match: bool = False  # every active measurement of the store's RIMs must equal one of its alternatives
    allowed_rim_ids: List[str] = field(default_factory=list)  # RIM SoftwareIdentity tagIds allowed; empty = any signed
    # allowed boards, PROJECT-PROJECT_SKU-CHIP_SKU from the signed evidence as a verdict's gpu[i].board shows them
    # (NVIDIA's H100 SXM5 sample: 1010-0200-882); empty = any. H100 and H200 share the GH100 chip and its
    # certificates: only a board pin (or a RIM match) tells them apart
    boards: List[str] = field(default_factory=list)
    revocation: Revocation = Revocation.off  # OCSP stance for the GPU certificate chain
    ocsp_cache: Optional[str] = None  # directory of cached DER OCSP responses, <serial hex>.der (never fetched)


#: The modes of a run (`medtee train`, `eval run`, `sweep`, `generate`), as its recipe digest records them.
RUN_MODES = ("train", "eval", "sweep", "generate")


#: A recipe setting as `medtee recipes digest --json` shows it: dotted lowercase names (qlora.rank, trainer.lr).
RECIPE_KEY = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)+")


@dataclass
class FieldRule:
    """What one setting of the recipe must be. Give `one_of`, or `min`/`max` for a number, or both."""

    key: str = ""  # the setting, dotted as `medtee recipes digest --json` shows it (e.g. qlora.rank, model.name)
    one_of: Optional[List[Any]] = None  # the value must equal one of these (true is not 1)
    min: Optional[float] = None  # the value must be a number at least this
    max: Optional[float] = None  # the value must be a number at most this

    def problems(self, where: str) -> list[str]:
        import math

        from medtee.schema import FILES_IN_DIGEST, NOT_IN_DIGEST

        if not RECIPE_KEY.fullmatch(self.key):
            return [f"{where}.key={self.key!r} is not a recipe setting: write its dotted name, e.g. qlora.rank"]
        if self.key in NOT_IN_DIGEST:
            return [f"{where}.key={self.key} is left out of the recipe digest (it cannot change what runs), so no "
                    f"recipe has it and the rule would release nothing; remove it"]
        out = []
        if tuple(self.key.split(".")) in FILES_IN_DIGEST and any(
                isinstance(v, str) and v != "dev" and not re.fullmatch(r"sha256:[0-9a-f]{64}", v)
                for v in self.one_of or []):
            out.append(f"{where}.one_of ({self.key}): the recipe records this file as sha256:<hex of its content> "
                       f"(`sha256sum FILE`), not its path")
        if self.one_of is None and self.min is None and self.max is None:
            out.append(f"{where} ({self.key}) restricts nothing: give one_of, min or max")
        if self.one_of is not None and not self.one_of:
            out.append(f"{where}.one_of ({self.key}) is empty: it would release to no recipe; list the allowed values")
        for name in ("min", "max"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                out.append(f"{where}.{name} ({self.key}) must be a finite number")
        if self.min is not None and self.max is not None and self.min > self.max:
            out.append(f"{where} ({self.key}): min {self.min} is above max {self.max}")
        return out


@dataclass
class AuditFloor:
    """With `require_audit`: the least strict memorization audit a recipe may run (its `release` settings). The
    defaults are the audit's own, so a recipe may tighten them but not loosen them, the per-repeat overrides
    (`release.max_exposure_at`) included."""

    max_exposure_bits: float = 10.0  # the highest exposure threshold the recipe may set, at any repeat count
    max_extraction_above_base: float = 0.05  # the highest verbatim-extraction rate above the base model's it may allow
    min_references: int = 4096  # the fewest reference candidates each canary is ranked among (fewer: coarser ranks)
    min_extraction_examples: int = 64  # the fewest training doctor turns prompted for verbatim extraction
    max_suffix_tokens: int = 50  # the longest continuation that must match exactly (longer ones are rarer)

    def problems(self) -> list[str]:
        import math

        out = [f"recipe.audit.{name}={value} must be a finite number" for name, value in
               (("max_exposure_bits", self.max_exposure_bits),
                ("max_extraction_above_base", self.max_extraction_above_base)) if not math.isfinite(value)]
        return out + [f"recipe.audit.{name}={getattr(self, name)} must be at least 1" for name in
                      ("min_references", "min_extraction_examples", "max_suffix_tokens") if getattr(self, name) < 1]


@dataclass
class DpBudget:
    """With `require_dp`: the most privacy the key releases of one dataset may spend together, by basic composition
    (the epsilons of its releases add up, and so do their deltas), counted by the broker from its audit log
    (`medtee.broker.budget`). None: no bound."""

    epsilon: Optional[float] = None  # the most total epsilon, e.g. 10
    delta: Optional[float] = None  # the most total delta, e.g. 1e-4

    def problems(self) -> list[str]:
        import math

        return [f"recipe.dp_budget.{name}={value} must be a finite positive number (or null for no bound)"
                for name, value in (("epsilon", self.epsilon), ("delta", self.delta))
                if value is not None and not (math.isfinite(value) and value > 0)]

    def bounds(self) -> bool:
        return self.epsilon is not None or self.delta is not None


@dataclass
class RecipeRules:
    """What the recipe of a run must say for the broker to release the key, checked on the recipe its digest covers
    (the release request carries it; its digest is bound into the evidence). Empty lists mean "any"."""

    digests: List[str] = field(default_factory=list)  # approved recipe digests (`medtee recipes digest`)
    # run modes released to; `generate` writes dialogue text (a rating packet) to the study key, so it is released
    # only when listed here, and under a production policy only to the study_recipients listed
    modes: List[str] = field(default_factory=lambda: ["train", "eval", "sweep"])
    study_recipients: List[str] = field(default_factory=list)  # sha256 (hex) of the study .pub files generate may use
    output_recipients: List[str] = field(default_factory=list)  # sha256 (hex) of the .pub files an adapter may go to
    require_audit: bool = False  # require release.require_audit: true (the memorization audit gates the adapter)
    audit: AuditFloor = field(default_factory=AuditFloor)  # with require_audit: how strict that audit must at least be
    require_dp: bool = False  # require privacy.dp.enabled: true (DP-SGD; then no training loss is logged at all)
    dp_budget: DpBudget = field(default_factory=DpBudget)  # with require_dp: the dataset's total over its releases
    min_aggregate: int = 20  # the least tracking.min_aggregate (examples per logged aggregate) a recipe may set
    # single settings, e.g. [{key: qlora.rank, max: 16}, {key: privacy.dp.target_epsilon, max: 3}, {key: model.id,
    # one_of: [google/medgemma-27b-text-it]}]; a setting the recipe does not have fails its rule; a sweep's every trial
    # is held to them
    fields: List[FieldRule] = field(default_factory=list)

    def read_recipe(self) -> bool:
        """Whether these rules look into the recipe (else only its digest is compared, if digests are listed)."""
        return (set(self.modes) != set(RUN_MODES) or bool(self.study_recipients or self.output_recipients)
                or self.require_audit or self.require_dp or self.min_aggregate > 1 or bool(self.fields))

    def problems(self, *, production: bool) -> list[str]:
        out = [f"recipe.digests: '{d}' is not a recipe digest (64 lowercase hex characters, as `medtee recipes "
               f"digest` prints)" for d in self.digests if not re.fullmatch(r"[0-9a-f]{64}", d)]
        for key in ("study_recipients", "output_recipients"):
            out += [f"recipe.{key}: '{d}' is not the sha256 of a public key file (64 lowercase hex characters, as "
                    f"`sha256sum KEY.pub` prints)" for d in getattr(self, key) if not re.fullmatch(r"[0-9a-f]{64}", d)]
        unknown = sorted(set(self.modes) - set(RUN_MODES))
        if unknown:
            out.append(f"recipe.modes: unknown {unknown}; choose from {', '.join(RUN_MODES)}")
        if production and "generate" in self.modes and not self.study_recipients:
            out.append("recipe.modes lists generate, whose rating packets hold dialogue text: a production policy must "
                       "name the study keys they may be encrypted to in recipe.study_recipients")
        if self.min_aggregate < 1:
            out.append(f"recipe.min_aggregate={self.min_aggregate} must be at least 1")
        out += self.audit.problems() + self.dp_budget.problems()
        if self.dp_budget.bounds() and not self.require_dp:
            out.append("recipe.dp_budget bounds the privacy the dataset's releases spend, which only DP-SGD runs "
                       "account: set recipe.require_dp: true with it")
        keys = [rule.key for rule in self.fields]
        out += [f"recipe.fields: {key} has more than one rule; merge them into one" for key in sorted(set(keys))
                if keys.count(key) > 1]
        for i, rule in enumerate(self.fields):
            out += rule.problems(f"recipe.fields[{i}]")
        return out


@dataclass
class AttestationPolicy:
    """An appraisal policy (also the Hydra schema of the `attestation` group). Empty lists mean "any"."""

    name: str = "simulated"  # policy name (file stem in conf/attestation/)
    provider: Provider = Provider.simulated  # CPU evidence provider a run uses: simulated | sev_snp | file
    gpu_provider: Optional[GpuProvider] = None  # GPU evidence provider a run uses: nvidia, or null for none
    production: bool = False  # production policies refuse simulated evidence and must bind REPORT_DATA
    allow_simulated: bool = False  # accept SIMULATED evidence (development only; protects nothing)
    authenticity_only: bool = False  # check only genuineness (chain, signature, TCB, reserved fields, binding)
    require_binding: bool = True  # reject when the verifier has no expected REPORT_DATA to compare
    report_versions: List[int] = field(default_factory=lambda: [2, 3, 5])  # accepted report VERSION values
    products: List[str] = field(default_factory=list)  # accepted AMD products (Milan, Genoa, Turin)
    signing_keys: List[str] = field(default_factory=lambda: ["vcek", "vlek"])  # accepted signing keys
    # accepted cspID of a VLEK (the cloud AMD issued it to, e.g. "CN=cc-us-east-2.amazonaws.com"); empty = any. A VLEK
    # signs for every chip of that cloud: with vlek in signing_keys, pin the cloud you deploy on
    vlek_csp_ids: List[str] = field(default_factory=list)
    measurements: List[str] = field(default_factory=list)  # allowed launch MEASUREMENTs (96 hex chars each);
    # a production policy must pin at least one (`medtee image measure ... --into FILE`): with none it releases nothing
    host_data: Optional[str] = None  # required HOST_DATA (64 hex chars)
    vmpl: Optional[int] = None  # required VMPL (0 = most privileged); null = any
    min_tcb: MinimumTcb = field(default_factory=MinimumTcb)  # minimum REPORTED_TCB and LAUNCH_TCB per component
    # the floor of the products named here instead of min_tcb (e.g. {Genoa: {bootloader: 10, snp: 23, microcode: 84}}):
    # AMD numbers SVNs per product, so one floor held to Milan's values refuses every Genoa, and lowered for Genoa
    # lets an out-of-date Milan through
    min_tcb_by_product: Dict[str, MinimumTcb] = field(default_factory=dict)
    min_firmware: str = "0.0.0"  # minimum current SNP firmware major.minor.build
    min_guest_svn: int = 0  # minimum GUEST_SVN
    allow_debug: bool = False  # accept POLICY.DEBUG=1 (the hypervisor can read guest memory)
    allow_migrate_ma: bool = False  # accept POLICY.MIGRATE_MA=1 (a migration agent may export the guest)
    allow_smt: bool = True  # accept POLICY.SMT=1 (guest may run with simultaneous multithreading)
    require_single_socket: bool = False  # require POLICY.SINGLE_SOCKET=1
    # PLATFORM_INFO flags the host must report set, from tsme, ecc, rapl_disabled, ciphertext_hiding,
    # alias_check_complete (the firmware checked memory for aliases: BadRAM), sev_tio; empty = none required
    require_platform: List[str] = field(default_factory=list)
    cert_cache_dir: Optional[str] = None  # directory of cached VCEKs/VLEKs (see amd.CertCache)
    fetch_certificates: bool = False  # fetch missing VCEKs from AMD's KDS (off for offline recipes)
    # AMD's CRL (revoked ASKs/ASVKs) from <cert_cache_dir>/<Product>/crl/<vcek|vlek>.der, which the operator refreshes
    # from https://kdsintf.amd.com/<vcek|vlek>/v1/<Product>/crl outside the TEE (never fetched during appraisal);
    # the shipped production policies fail closed
    amd_revocation: Revocation = Revocation.off
    gpu: GpuPolicy = field(default_factory=GpuPolicy)  # GPU requirements
    recipe: RecipeRules = field(default_factory=RecipeRules)  # what the run's recipe must say (key release only)

    def tcb_floor(self, product: str) -> MinimumTcb:
        """The least REPORTED_TCB and LAUNCH_TCB `product` must have."""
        return self.min_tcb_by_product.get(product, self.min_tcb)

    def problems(self) -> list[str]:
        """Inconsistencies, each naming the field and the fix (empty when the policy is usable)."""
        out = []
        if self.production and self.allow_simulated:
            out.append("production policies must set allow_simulated: false")
        if self.production and self.provider == Provider.simulated:
            out.append("production policies need provider sev_snp (or file), not simulated")
        if self.production and not self.require_binding:
            out.append("production policies must set require_binding: true")
        if self.production and self.authenticity_only:
            out.append("a production policy cannot be authenticity_only")
        for m in self.measurements:
            if not re.fullmatch(r"[0-9a-fA-F]{96}", m):
                out.append(f"measurements: '{m}' is not 96 hex characters (48 bytes)")
        out += self.recipe.problems(production=self.production)
        if self.host_data is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", self.host_data):
            out.append("host_data must be 64 hex characters (32 bytes)")
        if not re.fullmatch(r"\d+\.\d+\.\d+", self.min_firmware):
            out.append(f"min_firmware '{self.min_firmware}' must look like MAJOR.MINOR.BUILD")
        bad_keys = set(self.signing_keys) - {"vcek", "vlek"}
        if bad_keys or not self.signing_keys:
            out.append("signing_keys must be a non-empty subset of [vcek, vlek]")
        from medtee.attestation.snp import PLATFORM_FLAGS

        settable = [name for name in PLATFORM_FLAGS if name != "smt"]
        bad_flags = sorted(set(self.require_platform) - set(settable))
        if bad_flags:
            out.append(f"require_platform: unknown {bad_flags}; choose from {', '.join(settable)}"
                       + (" (SMT is ruled out with allow_smt: false)" if "smt" in bad_flags else ""))
        bad_products = set(self.products) - {"Milan", "Genoa", "Turin"}
        if bad_products:
            out.append(f"products: unknown {sorted(bad_products)}; use Milan, Genoa, Turin")
        bad_floors = sorted(set(self.min_tcb_by_product) - {"Milan", "Genoa", "Turin"})
        if bad_floors:
            out.append(f"min_tcb_by_product: unknown product {bad_floors}; use Milan, Genoa, Turin")
        unused = sorted(set(self.min_tcb_by_product) - set(self.products)) if self.products else []
        if unused:
            out.append(f"min_tcb_by_product: {unused} not in products, which refuses them; add them to products or "
                       f"remove their floor")
        if (self.gpu.require_rim_match or self.gpu.allowed_rim_ids) and not self.gpu.rim_store:
            out.append("gpu.require_rim_match / allowed_rim_ids need gpu.rim_store: the directory of signed RIMs")
        if (self.gpu.allowed_rim_ids or self.gpu.rim_store) and not self.gpu.require_rim_match:
            out.append("gpu.rim_store / allowed_rim_ids are used only with gpu.require_rim_match: true; set it or "
                       "leave them unset")
        out += [f"gpu.boards: '{b}' is not PROJECT-PROJECT_SKU-CHIP_SKU (e.g. 1010-0200-882, as a verdict's "
                f"gpu[i].board shows)" for b in self.gpu.boards if not GPU_BOARD.fullmatch(b)]
        out += [f"vlek_csp_ids: '{c}' is empty; write the cspID a verdict's policy.vlek_csp_id shows, or remove it"
                for c in self.vlek_csp_ids if not c.strip()]
        out += [f"vlek_csp_ids: '{c}' starts or ends with spaces, which no cspID matches (compared exactly); trim it"
                for c in self.vlek_csp_ids if c.strip() and c != c.strip()]
        if self.gpu.ocsp_cache and self.gpu.revocation is Revocation.off:
            out.append("gpu.ocsp_cache is set but gpu.revocation is off: set fail_open or fail_closed, or unset it")
        return out


def release_warning(policy: AttestationPolicy) -> str | None:
    """What a data owner must hear before relying on `policy` to release a dataset's key, or None."""
    if policy.allow_simulated:
        return (f"WARNING: release policy '{policy.name}' releases the key to SIMULATED attestation; it protects "
                f"nothing. For real data use a production policy that pins your image's launch measurement "
                f"(docs/deployment.md).")
    if policy.production and not policy.measurements:
        return (f"NOTE: release policy '{policy.name}' pins no launch measurement, so the broker releases the key to "
                f"no one until one is pinned: compute your image's (`medtee image measure ... --into FILE`), then "
                f"`medtee broker policy add NAME FILE` and `medtee broker policy set DATASET_ID NAME`.")
    return None


def policy_from_mapping(data: object, source: str) -> AttestationPolicy:
    """Validate a mapping (a YAML file or a composed config group) against the schema."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    if isinstance(data, Mapping) and data.get("provider") == Provider.sev_snp.value:
        data = {**data, "provider": Provider.sev_snp.name}  # policy files written before providers were an enum
    floors = data.get("min_tcb_by_product") if isinstance(data, Mapping) else None
    for product, floor in (floors.items() if isinstance(floors, Mapping) else ()):
        missing = [c for c in ("bootloader", "tee", "snp", "microcode") + (("fmc",) if product == "Turin" else ())
                   if not isinstance(floor, Mapping) or c not in floor]
        if missing:
            raise ValueError(f"attestation policy {source}: min_tcb_by_product.{product} leaves out "
                             f"{', '.join(missing)}, which would be 0 (any); write every component of the floor")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(AttestationPolicy), data)
        policy = OmegaConf.to_object(merged)
    except ConfigKeyError as exc:
        raise ValueError(f"attestation policy {source}: unknown key '{exc.full_key}'; correct its spelling or remove "
                         f"it ({_FIELDS_DOC})") from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "")
        what = str(getattr(exc, "msg", exc)).splitlines()[0]
        raise ValueError(f"attestation policy {source}: {f'key {key!r}: ' if key else ''}{what}; fix its value "
                         f"({_FIELDS_DOC})") from None
    problems = policy.problems()
    if problems:
        raise ValueError(f"attestation policy {source}: " + "; ".join(problems))
    return policy


def policy_document(data: bytes, source: str):
    """The mapping of a policy file's bytes (an OmegaConf DictConfig), validated against the schema; ValueError
    naming `source` and the problem."""
    import io

    import yaml
    from omegaconf import DictConfig, OmegaConf

    from medtee.files import yaml_alias_line

    try:
        line = yaml_alias_line(data)
        if line is not None:
            raise ValueError(f"attestation policy {source}, line {line}: YAML anchors and aliases are not allowed in "
                             f"policy files (write the values out)")
        doc = OmegaConf.load(io.BytesIO(data))
    except (yaml.YAMLError, OSError) as e:  # OSError: a document that is a bare scalar
        mark = getattr(e, "problem_mark", None)
        what = f"{e.problem}, line {mark.line + 1}" if mark and getattr(e, "problem", None) else str(e).splitlines()[0]
        raise ValueError(f"attestation policy {source}: not a YAML mapping ({what}); write a mapping of policy "
                         f"fields") from None
    if not isinstance(doc, DictConfig):
        raise ValueError(f"attestation policy {source}: is a YAML list; write a mapping of policy fields")
    if not doc:  # the schema's defaults are no policy anyone wrote
        raise ValueError(f"attestation policy {source}: is empty; write a mapping of policy fields, e.g. start from a "
                         f"shipped one: medtee broker policy show snp_h200")
    key = _interpolation_key(OmegaConf.to_container(doc, resolve=False))
    if key is not None:
        raise ValueError(f"attestation policy {source}: key '{key}' is an interpolation (${{...}}), resolved when the "
                         f"policy is read (${{oc.env:...}} reads the reader's environment), so the file's bytes and "
                         f"digest would not fix what it requires; write the value out")
    policy_from_mapping(doc, source)
    return doc


def _interpolation_key(node: object, where: str = "") -> str | None:
    """The dotted key of the first value in a policy document (a plain container) that holds `${`, or None."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, value in items:
        key = f"{where}[{k}]" if isinstance(node, list) else f"{where}.{k}" if where else str(k)
        found = key if isinstance(value, str) and "${" in value else _interpolation_key(value, key)
        if found is not None:
            return found
    return None


@dataclass(frozen=True)
class PolicyFile:
    """A policy YAML file as read: its path, bytes and validated policy."""

    path: Path
    data: bytes
    policy: AttestationPolicy

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def read_policy_file(path: Path | str, *, name: str | None = None) -> PolicyFile:
    """Read and validate a policy file (at most MAX_POLICY_FILE_BYTES, a regular file). The policy is named `name`
    (then the file's own `name`, if set, must be it: shipped and store files are named by their stem), else by the
    file's `name`, else by its stem. ValueError naming the file, the problem and the fix."""
    from omegaconf import OmegaConf

    from medtee.files import NotRegularFile, read_regular

    path = Path(path)
    try:
        data = read_regular(path, MAX_POLICY_FILE_BYTES)
    except FileNotFoundError:
        raise ValueError(f"policy file {path} does not exist; give a policy YAML file or a policy name "
                         f"(e.g. one in conf/attestation/)") from None
    except NotRegularFile as exc:
        raise ValueError(f"policy file {path} {exc}; give a policy YAML file") from None
    except OSError as exc:
        raise ValueError(f"policy file {path} cannot be read ({exc.strerror or type(exc).__name__})") from None
    doc = policy_document(data, str(path))
    own = doc.get("name")
    if name is not None and own not in (None, name):
        raise ValueError(f"attestation policy {path}: says name '{own}' but is read as '{name}'; set name: {name} in "
                         f"it or remove that key")
    policy = policy_from_mapping(OmegaConf.merge(doc, {"name": name or own or path.stem}), str(path))
    return PolicyFile(path=path, data=data, policy=policy)


def is_policy_path(spec: str) -> bool:
    """Whether a `--policy NAME|FILE` value is a FILE: it ends in .yaml / .yml or has a directory part."""
    return Path(spec).suffix in (".yaml", ".yml") or "/" in spec


def load_policy(name: str) -> AttestationPolicy:
    """Read and validate conf/attestation/<name>.yaml."""
    if not isinstance(name, str) or not POLICY_NAME.fullmatch(name):
        raise ValueError(f"attestation policy name '{name}' must be a file stem of conf/attestation/ (1-64 letters, "
                         f"digits, _ -)")
    path = conf_dir() / "attestation" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (conf_dir() / "attestation").glob("*.yaml"))
        raise ValueError(f"no attestation policy '{name}' ({path}); known: {', '.join(known)}")
    return read_policy_file(path, name=name).policy


def resolve_policy(spec: str) -> AttestationPolicy:
    """The policy `--policy NAME|FILE` gives: a FILE (`read_policy_file`, `check_not_shipped_lookalike`) or a
    shipped NAME (`load_policy`). ValueError naming the problem and the fix."""
    if not is_policy_path(spec):
        return load_policy(spec)
    return check_not_shipped_lookalike(read_policy_file(spec)).policy


def check_not_shipped_lookalike(file: PolicyFile) -> PolicyFile:
    """`file`, unless it takes a shipped policy's name without being that policy (a verdict or a dataset under it
    would read as under the shipped one): ValueError with the fix then."""
    shipped = conf_dir() / "attestation" / f"{file.policy.name}.yaml"
    if shipped.is_file() and load_policy(file.policy.name) != file.policy:
        raise ValueError(f"policy file {file.path} is named '{file.policy.name}', a shipped policy ({shipped}) that it "
                         f"differs from; set name: in it to your own, e.g. {file.policy.name}-site")
    return file
