"""The data owner's image tools: the expected SEV-SNP launch measurement of a confidential VM image
(`medtee image measure`), computed by sev-snp-measure, and pinning it in a release policy."""
