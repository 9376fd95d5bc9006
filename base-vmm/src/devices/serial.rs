//! The 16550 UART at 0x3f8 (COM1), built on vm-superio; its output goes to stdout, a file or
//! nowhere. Interrupts are raised through an eventfd (wired to GSI 4 when the VM has an irqchip).

use std::io::{LineWriter, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::{IoAction, PioDevice};

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Ports taken by a 16550.
pub const COM1_LEN: u16 = 8;
/// COM1's legacy interrupt line.
pub const COM1_GSI: u32 = 4;

/// Raises the UART interrupt by signalling an eventfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's console output goes.
pub type SerialSink = Box<dyn Write + Send>;

/// Opens a sink from a CLI spec: `stdout`, `none`, or a file path.
pub fn open_sink(spec: &str) -> std::io::Result<SerialSink> {
    Ok(match spec {
        "stdout" => Box::new(LineWriter::new(std::io::stdout())),
        "none" | "null" => Box::new(std::io::sink()),
        path => Box::new(LineWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        )),
    })
}

/// The UART's registers, saved and restored with the VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// COM1.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, SerialSink>,
}

impl SerialDevice {
    /// A UART writing to `sink`, raising interrupts on `irq`.
    pub fn new(irq: EventFd, sink: SerialSink) -> Self {
        SerialDevice {
            uart: Serial::new(EventFdTrigger(irq), sink),
        }
    }

    /// A UART with registers restored from `state`.
    pub fn from_state(
        irq: EventFd,
        sink: SerialSink,
        state: &SerialDeviceState,
    ) -> std::io::Result<Self> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&s, EventFdTrigger(irq), vm_superio::serial::NoEvents, sink)
            .map_err(|e| std::io::Error::other(format!("serial state: {e:?}")))?;
        Ok(SerialDevice { uart })
    }

    /// The registers, for a snapshot.
    pub fn state(&self) -> SerialDeviceState {
        let s = self.uart.state();
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// The interrupt eventfd (to wire to the irqchip).
    pub fn irq(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }
}

impl PioDevice for SerialDevice {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        let v = self.uart.read(port.wrapping_sub(COM1_BASE) as u8);
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) -> IoAction {
        if let Some(&b) = data.first() {
            // A failing console (closed pipe, full disk) must not stop the guest.
            let _ = self.uart.write(port.wrapping_sub(COM1_BASE) as u8, b);
            if b == b'\n' && port == COM1_BASE {
                crate::startup::mark_first(&crate::startup::FIRST_LINES, 4, "console line");
            }
        }
        IoAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn writes_reach_the_sink_and_state_round_trips() {
        let cap = Capture::default();
        let mut s = SerialDevice::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            Box::new(cap.clone()),
        );
        for b in b"hi\n" {
            s.pio_write(COM1_BASE, &[*b]);
        }
        assert_eq!(&*cap.0.lock().unwrap(), b"hi\n");
        s.pio_write(COM1_BASE + 7, &[0x5a]); // scratch register
        let st = s.state();
        assert_eq!(st.scratch, 0x5a);
        let mut r = SerialDevice::from_state(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            Box::new(std::io::sink()),
            &st,
        )
        .unwrap();
        let mut d = [0u8];
        r.pio_read(COM1_BASE + 7, &mut d);
        assert_eq!(d[0], 0x5a);
    }
}
