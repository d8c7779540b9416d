"""NVIDIA H100/H200 evidence through NVML (`nvidia-ml-py`): CC state, SPDM attestation report, certificate chain."""

from __future__ import annotations

from medtee.attestation.evidence import Evidence, GpuEvidence

MIN_DRIVER = (535, 0)  # first driver series with confidential-computing attestation in NVML


def _pem_certificates(data: bytes) -> tuple[bytes, ...]:
    from cryptography.hazmat.primitives.serialization import Encoding

    from medtee.attestation.certs import parse_certificates

    return tuple(c.public_bytes(Encoding.DER) for c in parse_certificates(data))


class NvmlProvider:
    """Per-GPU evidence for a 32-byte GPU nonce (binding.gpu_nonce); `collect` returns GPU-only evidence."""

    name = "nvidia"
    simulated = False

    def _nvml(self):
        import pynvml

        pynvml.nvmlInit()
        return pynvml

    def unavailable_reason(self) -> str | None:
        try:
            import pynvml
        except ImportError:
            return "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            return f"NVML cannot start ({exc}): no NVIDIA driver or no GPU"
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            major_minor = tuple(int(p) for p in str(driver).split(".")[:2])
            if major_minor < MIN_DRIVER:
                return f"NVIDIA driver {driver} is too old for confidential-computing attestation (need >= 535)"
            if pynvml.nvmlDeviceGetCount() == 0:
                return "no NVIDIA GPU is visible"
            try:
                state = pynvml.nvmlSystemGetConfComputeState()
            except pynvml.NVMLError as exc:
                return f"confidential-computing state unavailable ({exc}): GPU or driver without CC support"
            if state.ccFeature != pynvml.NVML_CC_SYSTEM_FEATURE_ENABLED:
                return "GPU confidential computing is OFF (nvidia-smi conf-compute -f); enable CC mode on the host"
            if state.devToolsMode == pynvml.NVML_CC_SYSTEM_DEVTOOLS_MODE_ON:
                return "GPU is in confidential-computing developer-tools mode, which has no memory protection"
            return None
        finally:
            pynvml.nvmlShutdown()

    def collect_gpus(self, gpu_nonce: bytes) -> tuple[GpuEvidence, ...]:
        """SPDM report (request||response) and the attestation certificate chain of every GPU."""
        if len(gpu_nonce) != 32:
            raise ValueError(f"the GPU nonce must be 32 bytes; got {len(gpu_nonce)}")
        nvml = self._nvml()
        try:
            state = nvml.nvmlSystemGetConfComputeState()
            cc_on = state.ccFeature == nvml.NVML_CC_SYSTEM_FEATURE_ENABLED
            devtools = state.devToolsMode == nvml.NVML_CC_SYSTEM_DEVTOOLS_MODE_ON
            out = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                rep = nvml.nvmlDeviceGetConfComputeGpuAttestationReport(handle, list(gpu_nonce))
                cert = nvml.nvmlDeviceGetConfComputeGpuCertificate(handle)
                report = bytes(rep.attestationReport[: rep.attestationReportSize])
                chain = bytes(cert.attestationCertChain[: cert.attestationCertChainSize])
                out.append(GpuEvidence(report=report, certificates=_pem_certificates(chain),
                                       cc_feature=cc_on, devtools_mode=devtools))
            return tuple(out)
        finally:
            nvml.nvmlShutdown()

    def collect(self, report_data: bytes) -> Evidence:
        """GPU-only evidence (empty CPU report) for a 32-byte GPU nonce; combine with CPU evidence via collect_evidence."""
        return Evidence(provider=self.name, snp_report=b"", gpus=self.collect_gpus(report_data))
