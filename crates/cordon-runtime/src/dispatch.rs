//! [`Runtimes`]: one [`Runtime`] over both backends, routing each sandbox to the backend its
//! spec names, so the server keeps a single `Arc<dyn Runtime>`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::{
    Backend, ChannelIo, Isolation, MicrovmRuntime, ResourceUsage, Runtime, RuntimeError,
    SandboxSpec, SandboxState,
};

/// The namespace backend plus, when the guest kernel is prepared, the microVM backend.
pub struct Runtimes {
    namespace: Arc<dyn Runtime>,
    microvm: Option<Arc<MicrovmRuntime>>,
    /// Which backend holds each known sandbox (filled by `create` and `adopt`).
    owners: Mutex<HashMap<String, Backend>>,
}

impl Runtimes {
    pub fn new(namespace: Arc<dyn Runtime>, microvm: Option<Arc<MicrovmRuntime>>) -> Runtimes {
        Runtimes {
            namespace,
            microvm,
            owners: Mutex::new(HashMap::new()),
        }
    }

    /// The microVM backend, if configured.
    pub fn microvm(&self) -> Option<&Arc<MicrovmRuntime>> {
        self.microvm.as_ref()
    }

    fn backend(&self, backend: Backend) -> Result<&dyn Runtime, RuntimeError> {
        match backend {
            Backend::Namespace => Ok(self.namespace.as_ref()),
            Backend::Microvm => match &self.microvm {
                Some(microvm) => Ok(microvm.as_ref()),
                None => Err(RuntimeError::InvalidSpec(
                    "the microvm runtime is not available on this server (run `cordon prepare` for the guest kernel)".into(),
                )),
            },
        }
    }

    fn owner(&self, id: &str) -> Result<&dyn Runtime, RuntimeError> {
        crate::validate_id(id)?;
        let backend = self
            .owners
            .lock()
            .expect("owners lock")
            .get(id)
            .copied()
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        self.backend(backend)
    }
}

#[async_trait]
impl Runtime for Runtimes {
    async fn create(&self, spec: SandboxSpec) -> Result<(), RuntimeError> {
        crate::validate_id(&spec.id)?;
        let backend = spec.backend;
        let runtime = self.backend(backend)?;
        if self
            .owners
            .lock()
            .expect("owners lock")
            .contains_key(&spec.id)
        {
            return Err(RuntimeError::AlreadyExists(spec.id.clone()));
        }
        let id = spec.id.clone();
        runtime.create(spec).await?;
        self.owners.lock().expect("owners lock").insert(id, backend);
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.owner(id)?.start(id).await
    }

    async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        self.owner(id)?.stop(id).await
    }

    async fn destroy(&self, id: &str) -> Result<(), RuntimeError> {
        self.owner(id)?.destroy(id).await?;
        self.owners.lock().expect("owners lock").remove(id);
        Ok(())
    }

    async fn open_channel(&self, id: &str) -> Result<Box<dyn ChannelIo>, RuntimeError> {
        self.owner(id)?.open_channel(id).await
    }

    async fn state(&self, id: &str) -> Result<SandboxState, RuntimeError> {
        self.owner(id)?.state(id).await
    }

    async fn capture(&self, id: &str, dest: &Path) -> Result<u64, RuntimeError> {
        self.owner(id)?.capture(id, dest).await
    }

    async fn usage(&self, id: &str) -> Result<ResourceUsage, RuntimeError> {
        self.owner(id)?.usage(id).await
    }

    async fn adopt(&self) -> Result<Vec<(String, SandboxState)>, RuntimeError> {
        let mut found = Vec::new();
        let mut backends: Vec<(Backend, &dyn Runtime)> =
            vec![(Backend::Namespace, self.namespace.as_ref())];
        if let Some(microvm) = &self.microvm {
            backends.push((Backend::Microvm, microvm.as_ref()));
        }
        for (backend, runtime) in backends {
            for (id, state) in runtime.adopt().await? {
                self.owners
                    .lock()
                    .expect("owners lock")
                    .insert(id.clone(), backend);
                found.push((id, state));
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found)
    }

    fn supports(&self, backend: Backend) -> bool {
        self.backend(backend).is_ok()
    }

    fn isolation(&self, id: &str) -> Isolation {
        match self.owner(id) {
            Ok(runtime) => runtime.isolation(id),
            Err(_) => Isolation::Namespace,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A namespace stand-in that records which ids it was asked about.
    #[derive(Default)]
    struct Fake(Mutex<Vec<String>>);

    #[async_trait]
    impl Runtime for Fake {
        async fn create(&self, spec: SandboxSpec) -> Result<(), RuntimeError> {
            self.0.lock().unwrap().push(format!("create {}", spec.id));
            Ok(())
        }
        async fn start(&self, id: &str) -> Result<(), RuntimeError> {
            self.0.lock().unwrap().push(format!("start {id}"));
            Ok(())
        }
        async fn stop(&self, _: &str) -> Result<(), RuntimeError> {
            Ok(())
        }
        async fn destroy(&self, id: &str) -> Result<(), RuntimeError> {
            self.0.lock().unwrap().push(format!("destroy {id}"));
            Ok(())
        }
        async fn open_channel(&self, id: &str) -> Result<Box<dyn ChannelIo>, RuntimeError> {
            Err(RuntimeError::NotFound(id.into()))
        }
        async fn state(&self, _: &str) -> Result<SandboxState, RuntimeError> {
            Ok(SandboxState::Created)
        }
        async fn capture(&self, _: &str, _: &Path) -> Result<u64, RuntimeError> {
            Ok(0)
        }
        async fn usage(&self, _: &str) -> Result<ResourceUsage, RuntimeError> {
            Ok(ResourceUsage::default())
        }
        async fn adopt(&self) -> Result<Vec<(String, SandboxState)>, RuntimeError> {
            Ok(vec![("old".into(), SandboxState::Stopped)])
        }
    }

    fn spec(id: &str, backend: Backend) -> SandboxSpec {
        SandboxSpec {
            id: id.into(),
            layers: vec!["/layer".into()],
            limits: Default::default(),
            hostname: "sandbox".into(),
            agent_config: Default::default(),
            backend,
            weaken: Default::default(),
        }
    }

    #[tokio::test]
    async fn routes_by_the_stored_backend_and_refuses_a_missing_one() {
        let fake = Arc::new(Fake::default());
        let runtimes = Runtimes::new(fake.clone(), None);
        assert!(runtimes.supports(Backend::Namespace));
        assert!(!runtimes.supports(Backend::Microvm));
        assert!(matches!(
            runtimes.create(spec("vm", Backend::Microvm)).await,
            Err(RuntimeError::InvalidSpec(_))
        ));
        assert!(matches!(
            runtimes.start("vm").await,
            Err(RuntimeError::NotFound(_))
        ));

        runtimes
            .create(spec("ns", Backend::Namespace))
            .await
            .unwrap();
        assert!(matches!(
            runtimes.create(spec("ns", Backend::Namespace)).await,
            Err(RuntimeError::AlreadyExists(_))
        ));
        runtimes.start("ns").await.unwrap();
        assert_eq!(runtimes.isolation("ns"), Isolation::Namespace);
        runtimes.destroy("ns").await.unwrap();
        assert!(matches!(
            runtimes.start("ns").await,
            Err(RuntimeError::NotFound(_))
        ));

        // Adopted sandboxes are routed to the backend that found them.
        assert_eq!(runtimes.adopt().await.unwrap().len(), 1);
        runtimes.start("old").await.unwrap();
        assert_eq!(
            *fake.0.lock().unwrap(),
            ["create ns", "start ns", "destroy ns", "start old"]
        );
    }

    #[test]
    fn backends_parse_and_name_themselves() {
        for backend in [Backend::Namespace, Backend::Microvm] {
            assert_eq!(backend.as_str().parse::<Backend>(), Ok(backend));
        }
        assert!("qemu".parse::<Backend>().is_err());
        assert_eq!(
            crate::isolation_of(Backend::Namespace),
            Isolation::Namespace
        );
        assert_eq!(Isolation::MicrovmTcg.as_str(), "microvm-tcg");
        assert_eq!(
            serde_json::to_string(&Isolation::MicrovmKvm).unwrap(),
            "\"microvm-kvm\""
        );
    }
}
