//! Name resolution for the proxy (hickory): each connection resolves its host once and the
//! proxy connects only to an address it checked, so a rebinding answer cannot slip in
//! between check and connect.

use std::net::IpAddr;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;

use crate::proxy::{ProxyError, ResolverSettings};

/// Most addresses considered per name.
const MAX_ADDRESSES: usize = 16;

pub(crate) struct Resolver {
    inner: TokioResolver,
    timeout: Duration,
}

impl Resolver {
    pub(crate) fn new(
        settings: &ResolverSettings,
        timeout: Duration,
    ) -> Result<Resolver, ProxyError> {
        let mut builder = match settings {
            ResolverSettings::System => TokioResolver::builder_tokio().map_err(|e| {
                ProxyError::Resolver(format!("reading the system resolver configuration: {e}"))
            })?,
            ResolverSettings::Nameserver(addr) => {
                let group = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
                TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, vec![], group),
                    TokioConnectionProvider::default(),
                )
            }
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = timeout.min(Duration::from_secs(5));
        opts.attempts = 2;
        // The sandbox's names are resolved for the outside world, never from host files.
        opts.use_hosts_file = ResolveHosts::Never;
        opts.ndots = 0;
        Ok(Resolver {
            inner: builder.build(),
            timeout,
        })
    }

    /// The addresses of `name` (a normalised name, no trailing dot).
    pub(crate) async fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        let fqdn = format!("{name}.");
        let answer = tokio::time::timeout(self.timeout, self.inner.lookup_ip(fqdn.as_str()))
            .await
            .map_err(|_| format!("resolving {name} timed out"))?
            .map_err(|e| format!("resolving {name}: {e}"))?;
        let ips: Vec<IpAddr> = answer.iter().take(MAX_ADDRESSES).collect();
        if ips.is_empty() {
            return Err(format!("{name} has no address"));
        }
        Ok(ips)
    }
}
