//! The devices' event loop: one thread per VM, an `event-manager` on epoll, woken by the
//! ioeventfds KVM signals when the guest writes a QueueNotify register.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::MmioTransport;
use crate::devices::lock;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Serves one device's notifications.
struct Notifier {
    transport: Arc<Mutex<MmioTransport>>,
    fd: EventFd,
}

impl MutEventSubscriber for Notifier {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Consume the count first: a notification arriving while the queues are served
        // wakes the loop again.
        let _ = self.fd.read();
        lock(&self.transport).process();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            tracing::error!("virtio: cannot watch a queue notifier: {e:?}");
        }
    }
}

/// Serves a device's backend fd (a tap with frames waiting), edge-triggered: the device
/// drains what it can; what is left waits for the guest's next notification or a new frame.
struct Backend {
    transport: Arc<Mutex<MmioTransport>>,
    fd: std::os::fd::RawFd,
}

impl MutEventSubscriber for Backend {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        lock(&self.transport).process();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let set = EventSet::IN | EventSet::EDGE_TRIGGERED;
        if let Err(e) = ops.add(Events::new_raw(self.fd, set)) {
            tracing::error!("virtio: cannot watch a device backend: {e:?}");
        }
    }
}

/// Wakes the loop to stop.
struct Waker(EventFd);

impl MutEventSubscriber for Waker {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            tracing::error!("virtio: cannot watch the event loop's waker: {e:?}");
        }
    }
}

/// The running event loop; stopped when dropped.
pub struct EventLoop {
    stop: Arc<AtomicBool>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts the loop serving `devices`, each with the eventfd KVM signals on its
    /// QueueNotify register.
    pub fn start(devices: Vec<(Arc<Mutex<MmioTransport>>, EventFd)>) -> std::io::Result<Self> {
        let mut em = EventManager::<Subscriber>::new()
            .map_err(|e| std::io::Error::other(format!("event manager: {e:?}")))?;
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        em.add_subscriber(Arc::new(Mutex::new(Waker(wake.try_clone()?))));
        for (transport, fd) in devices {
            // The fd stays open as long as the device, which the subscriber keeps alive.
            if let Some(backend) = lock(&transport).backend_fd() {
                em.add_subscriber(Arc::new(Mutex::new(Backend {
                    transport: transport.clone(),
                    fd: backend,
                })));
            }
            em.add_subscriber(Arc::new(Mutex::new(Notifier { transport, fd })));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("virtio-io".into())
            .spawn(move || {
                crate::seccomp::enter_or_log(crate::seccomp::Role::Device);
                while !stopping.load(Ordering::Acquire) {
                    if let Err(e) = em.run() {
                        tracing::error!("virtio event loop: {e:?}");
                        break;
                    }
                }
            })?;
        Ok(EventLoop {
            stop,
            wake,
            thread: Some(thread),
        })
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
