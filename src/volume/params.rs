//! StorageClass parameters as a typed set of keys. Unknown keys are an
//! error; keys the Kubernetes provisioner adds (`csi.storage.k8s.io/…`) are
//! accepted and ignored.

use std::collections::BTreeMap;

use super::BackendKind;

/// Parameter keys stowage understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKey {
    /// `backend`: `block` (default) or `dir`.
    Backend,
    /// `node`: the node the volume must be made on (a cluster places a
    /// volume without topology there; any other node refuses it).
    Node,
}

impl ParamKey {
    pub const ALL: [ParamKey; 2] = [ParamKey::Backend, ParamKey::Node];

    pub fn as_str(self) -> &'static str {
        match self {
            ParamKey::Backend => "backend",
            ParamKey::Node => "node",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Mutable parameters (VolumeAttributesClass, ControllerModifyVolume).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MutableParameters {
    /// `provisioning`: `thin` (default) or `thick`; None when not given.
    pub thick: Option<bool>,
    /// `onDelete` (object volumes): `delete` or `retain`; None when not
    /// given.
    pub retain: Option<bool>,
}

impl MutableParameters {
    /// Parses mutable parameters for a volume of `backend`; unknown keys,
    /// values, or keys that do not apply to the backend are refused.
    pub fn parse(map: &BTreeMap<String, String>, backend: BackendKind) -> Result<Self, String> {
        let mut out = MutableParameters::default();
        for (k, v) in map {
            match k.as_str() {
                "provisioning" => {
                    if !backend
                        .profile()
                        .mutable_parameters()
                        .contains(&"provisioning")
                    {
                        return Err(format!(
                            "provisioning applies to block volumes, not {backend}"
                        ));
                    }
                    out.thick = Some(match v.as_str() {
                        "thin" => false,
                        "thick" => true,
                        other => {
                            return Err(format!(
                                "provisioning={other:?}: expected \"thin\" or \"thick\""
                            ));
                        }
                    });
                }
                "onDelete" if backend.profile().mutable_parameters().contains(&"onDelete") => {
                    out.retain = Some(match v.as_str() {
                        "delete" => false,
                        "retain" => true,
                        other => {
                            return Err(format!(
                                "onDelete={other:?}: expected \"delete\" or \"retain\""
                            ));
                        }
                    });
                }
                other => {
                    return Err(format!(
                        "unknown mutable parameter {other:?} for {backend} volumes (known: {})",
                        backend.profile().mutable_parameters().join(", ")
                    ));
                }
            }
        }
        Ok(out)
    }
}

/// The prefix of keys added by Kubernetes sidecars (PVC name, namespace...).
pub const KUBERNETES_PREFIX: &str = "csi.storage.k8s.io/";

/// Validated StorageClass parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parameters {
    pub backend: BackendKind,
    /// The node the volume must live on, if the parameters pin one.
    pub node: Option<String>,
}

impl Parameters {
    /// Parses a parameter map, naming the offending key on error.
    pub fn parse(map: &BTreeMap<String, String>) -> Result<Self, String> {
        let mut backend = BackendKind::Block;
        if let Some(v) = map.get(ParamKey::Backend.as_str()) {
            backend = v.parse().map_err(|()| {
                format!("parameter backend={v:?}: expected \"block\", \"dir\", \"object\" or \"replicated\"")
            })?;
        }
        let mut node = None;
        for (k, v) in map {
            if k.starts_with(KUBERNETES_PREFIX) {
                continue;
            }
            // The backend's own keys, which it parses itself.
            if backend.profile().parameters().contains(&k.as_str()) {
                continue;
            }
            match ParamKey::parse(k) {
                Some(ParamKey::Backend) => {}
                Some(ParamKey::Node) => {
                    if !super::id::valid_node_id(v) {
                        return Err(format!(
                            "parameter node={v:?}: not a node id (1-63 of [A-Za-z0-9._-])"
                        ));
                    }
                    node = Some(v.clone());
                }
                None if k == "provisioning" => {
                    return Err(format!(
                        "{k:?} is a mutable parameter: give it in mutable_parameters \
                         (stowage volume create --mutable-param {k}={v}), not in parameters"
                    ));
                }
                None => {
                    let mut known: Vec<&str> = ParamKey::ALL.map(ParamKey::as_str).to_vec();
                    known.extend(backend.profile().parameters());
                    return Err(format!(
                        "unknown parameter {k:?} for {backend} volumes (known: {})",
                        known.join(", ")
                    ));
                }
            }
        }
        Ok(Parameters { backend, node })
    }

    /// The parameters that define the volume (used to compare repeated
    /// CreateVolume calls): everything but the Kubernetes metadata keys.
    pub fn defining(map: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        map.iter()
            .filter(|(k, _)| !k.starts_with(KUBERNETES_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_to_block_and_ignores_kubernetes_keys() {
        let p = Parameters::parse(&map(&[("csi.storage.k8s.io/pvc/name", "x")])).unwrap();
        assert_eq!(p.backend, BackendKind::Block);
        let p = Parameters::parse(&map(&[("backend", "dir")])).unwrap();
        assert_eq!(p.backend, BackendKind::Dir);
    }

    #[test]
    fn rejects_unknown_keys_and_values() {
        assert!(
            Parameters::parse(&map(&[("size", "1")]))
                .unwrap_err()
                .contains("size")
        );
        assert!(Parameters::parse(&map(&[("backend", "tape")])).is_err());
    }

    proptest! {
        #[test]
        fn never_panics(k in "\\PC{0,30}", v in "\\PC{0,30}") {
            let _ = Parameters::parse(&map(&[(&k, &v)]));
        }
    }
}
