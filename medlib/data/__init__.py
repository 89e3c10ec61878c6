"""The data layer: loaders that normalise every source to MCQ or dialogue records, validation,
deterministic mixtures with manifests, decontamination, and the local profile's stand-ins."""
