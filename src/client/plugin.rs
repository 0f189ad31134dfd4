//! `stowage plugin info|capabilities|probe`: the Identity service, plus the
//! controller and node capability lists.

use std::collections::BTreeMap;

use clap::Subcommand;
use serde::Serialize;

use super::output::{Table, emit, join_map};
use super::{ClientError, GlobalArgs, OutputFormat, Session, rpc};
use crate::csi;

#[derive(Debug, clap::Args)]
pub struct PluginArgs {
    #[command(flatten)]
    pub globals: GlobalArgs,
    #[command(subcommand)]
    pub verb: PluginVerb,
}

#[derive(Debug, Subcommand)]
pub enum PluginVerb {
    /// The plugin's name, version and manifest (GetPluginInfo).
    Info,
    /// What the plugin, its controller and its node service offer.
    Capabilities,
    /// Whether the plugin is ready (Probe): prints `ready` (exit status 0)
    /// or `not-ready` (exit status 1).
    Probe,
}

/// GetPluginInfo, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct PluginInfoView {
    pub name: String,
    pub vendor_version: String,
    pub manifest: BTreeMap<String, String>,
}

/// Capability names as the CSI spec spells them, per service.
#[derive(Debug, Clone, Serialize)]
pub struct CapabilitiesView {
    pub plugin: Vec<String>,
    pub controller: Vec<String>,
    pub node: Vec<String>,
}

/// Probe, as printed. A plugin that leaves `ready` unset is ready (CSI spec,
/// Probe: "the CO MAY assume the plugin is ready").
#[derive(Debug, Clone, Serialize)]
pub struct ProbeView {
    pub ready: bool,
}

pub async fn run(
    s: &mut Session,
    verb: PluginVerb,
    format: OutputFormat,
) -> Result<(), ClientError> {
    match verb {
        PluginVerb::Info => {
            let r = s
                .identity
                .get_plugin_info(csi::GetPluginInfoRequest {})
                .await
                .map_err(rpc("GetPluginInfo"))?
                .into_inner();
            let v = PluginInfoView {
                name: r.name,
                vendor_version: r.vendor_version,
                manifest: r.manifest.into_iter().collect(),
            };
            emit(format, &v, || {
                let mut t = Table::new(&["NAME", "VERSION", "MANIFEST"]);
                t.row(vec![
                    v.name.clone(),
                    v.vendor_version.clone(),
                    join_map(&v.manifest),
                ]);
                t
            })
        }
        PluginVerb::Capabilities => {
            let v = CapabilitiesView {
                plugin: s
                    .plugin_capabilities()
                    .await?
                    .iter()
                    .filter_map(plugin_capability_name)
                    .collect(),
                controller: s
                    .controller_rpcs()
                    .await?
                    .iter()
                    .map(|t| t.as_str_name().to_owned())
                    .collect(),
                node: s
                    .node_rpcs()
                    .await?
                    .iter()
                    .map(|t| t.as_str_name().to_owned())
                    .collect(),
            };
            emit(format, &v, || {
                let mut t = Table::new(&["SERVICE", "CAPABILITY"]);
                for (service, names) in [
                    ("plugin", &v.plugin),
                    ("controller", &v.controller),
                    ("node", &v.node),
                ] {
                    for n in names {
                        t.row(vec![service.to_owned(), n.clone()]);
                    }
                }
                t
            })
        }
        PluginVerb::Probe => {
            let r = s
                .identity
                .probe(csi::ProbeRequest {})
                .await
                .map_err(rpc("Probe"))?
                .into_inner();
            let v = ProbeView {
                ready: r.ready.unwrap_or(true),
            };
            match format {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                OutputFormat::Table => println!("{}", if v.ready { "ready" } else { "not-ready" }),
            }
            if v.ready {
                Ok(())
            } else {
                Err(ClientError::NotReady)
            }
        }
    }
}

/// `CONTROLLER_SERVICE`, `VOLUME_EXPANSION_ONLINE`, …; `None` for kinds
/// this client does not know.
fn plugin_capability_name(c: &csi::PluginCapability) -> Option<String> {
    use csi::plugin_capability::{Type, service, volume_expansion};
    match c.r#type.as_ref()? {
        Type::Service(s) => service::Type::try_from(s.r#type)
            .ok()
            .map(|t| t.as_str_name().to_owned()),
        Type::VolumeExpansion(e) => volume_expansion::Type::try_from(e.r#type)
            .ok()
            .map(|t| format!("VOLUME_EXPANSION_{}", t.as_str_name())),
    }
}
