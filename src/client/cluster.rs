//! `stowage cluster init|issue`: makes the certificates stowage processes
//! on several hosts authenticate each other with (local files only, no
//! endpoint), and says where they went and how to hand them out.

use std::path::{Path, PathBuf};

use clap::Subcommand;

use crate::cluster::tls::{self, CA_CERT_FILE, CA_KEY_FILE, CERT_FILE, KEY_FILE, TlsError};

/// `stowage cluster …`
#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub verb: ClusterVerb,
}

/// The cluster verbs.
#[derive(Debug, Subcommand)]
pub enum ClusterVerb {
    /// Make a cluster CA and a shared cluster certificate in DIR: ca.crt,
    /// ca.key, tls.crt, tls.key. Never overwrites.
    Init {
        /// Where to write them (created if missing).
        dir: PathBuf,
    },
    /// Make a certificate that may act only as node N, signed by the CA in
    /// --ca-dir, in OUT: ca.crt, tls.crt, tls.key. Never overwrites.
    Issue {
        /// A directory made by `stowage cluster init` (its ca.crt and ca.key).
        #[arg(long)]
        ca_dir: PathBuf,
        /// The node id the certificate is bound to (the node's --node-id).
        #[arg(long)]
        node: String,
        /// Where to write them (created if missing).
        out: PathBuf,
    },
}

/// Runs one cluster verb and prints what it wrote.
pub fn run(args: ClusterArgs) -> Result<(), TlsError> {
    match args.verb {
        ClusterVerb::Init { dir } => {
            tls::init(&dir)?;
            print!("{}", init_report(&dir));
        }
        ClusterVerb::Issue { ca_dir, node, out } => {
            tls::issue_node(&ca_dir, &node, &out)?;
            print!("{}", issue_report(&ca_dir, &node, &out));
        }
    }
    Ok(())
}

fn init_report(dir: &Path) -> String {
    let f = |name| dir.join(name).display().to_string();
    let (ca, ca_key, cert, key) = (f(CA_CERT_FILE), f(CA_KEY_FILE), f(CERT_FILE), f(KEY_FILE));
    format!(
        "Wrote a new cluster CA and a shared cluster certificate:\n\
         \x20 {ca}  the CA certificate\n\
         \x20 {ca_key}  the CA's private key (0600): only `stowage cluster issue` needs it;\n\
         \x20   keep it off the nodes\n\
         \x20 {cert}  the shared certificate: its holder may act as the controller\n\
         \x20   and register as any node\n\
         \x20 {key}  its private key (0600)\n\
         Give every stowage process ca.crt, tls.crt and tls.key (never ca.key) as its\n\
         --tls-dir, e.g. as a Kubernetes Secret:\n\
         \x20 kubectl create secret generic stowage-tls --from-file={ca} --from-file={cert} --from-file={key}\n\
         For a node that may register only as itself:\n\
         \x20 stowage cluster issue --ca-dir {} --node NODE OUT\n",
        dir.display()
    )
}

fn issue_report(ca_dir: &Path, node: &str, out: &Path) -> String {
    let f = |name| out.join(name).display().to_string();
    let (ca, cert, key) = (f(CA_CERT_FILE), f(CERT_FILE), f(KEY_FILE));
    // A Secret's name is a lower-case DNS label.
    let secret = format!(
        "stowage-tls-{}",
        node.to_ascii_lowercase().replace('_', "-")
    );
    format!(
        "Wrote a certificate for node {node}, signed by the CA in {}:\n\
         \x20 {ca}  the CA certificate\n\
         \x20 {cert}  node {node}'s certificate: its holder may register only as {node}\n\
         \x20 {key}  its private key (0600)\n\
         Give them to node {node} as its --tls-dir, e.g. as a Kubernetes Secret mounted\n\
         only on that node:\n\
         \x20 kubectl create secret generic {secret} --from-file={ca} --from-file={cert} --from-file={key}\n",
        ca_dir.display()
    )
}
