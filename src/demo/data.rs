//! The demo's made-up people and records. Every name, number and result here is
//! invented; the health card numbers are in the Ontario test format (they pass the Luhn
//! check) and belong to nobody.

/// The demo clinician, with OSCAR's classic demo login.
pub const PROVIDER_NO: &str = "999998";
pub const PROVIDER_NAME: &str = "Dr. Oscar Doctor";
pub const EMR_USER: &str = "oscardoc";
pub const EMR_PASSWORD: &str = "mac2002";
pub const EMR_PIN: &str = "1117";

/// The demo ONE ID account (second factor: TOTP with [`TOTP_SECRET`]).
pub const ONEID_USER: &str = "oscar.doctor@oneid.demo";
pub const ONEID_PASSWORD: &str = "demo-Passw0rd";
/// The shared TOTP secret (raw bytes) and its base32 form for authenticator apps.
pub const TOTP_SECRET: &[u8] = b"ehrgate-demo-totp-key";
pub const TOTP_SECRET_BASE32: &str = "MVUHEZ3BORSS2ZDFNVXS25DPORYC223FPE";

pub struct Patient {
    pub demographic_no: &'static str,
    pub family: &'static str,
    pub given: &'static str,
    pub hcn: &'static str,
    pub hcn_version: &'static str,
    pub dob: (u16, u8, u8),
    pub sex: &'static str,
    pub mrp: &'static str,
    pub appointment: &'static str,
    pub reason: &'static str,
}

pub const PATIENTS: &[Patient] = &[
    Patient {
        demographic_no: "1001",
        family: "Tremblay",
        given: "Marie",
        hcn: "9876543217",
        hcn_version: "AB",
        dob: (1958, 3, 14),
        sex: "F",
        mrp: PROVIDER_NO,
        appointment: "09:00",
        reason: "Diabetes follow-up",
    },
    Patient {
        demographic_no: "1002",
        family: "Okafor",
        given: "Daniel",
        hcn: "1234567897",
        hcn_version: "CD",
        dob: (1984, 11, 2),
        sex: "M",
        mrp: "100200",
        appointment: "09:30",
        reason: "Walk-in: chest pain, resolved",
    },
    Patient {
        demographic_no: "1003",
        family: "Nguyen",
        given: "Linh",
        hcn: "5554443332",
        hcn_version: "EF",
        dob: (1991, 6, 27),
        sex: "F",
        mrp: PROVIDER_NO,
        appointment: "10:15",
        reason: "Prenatal visit",
    },
    Patient {
        demographic_no: "1004",
        family: "MacLeod",
        given: "Angus",
        hcn: "2468135799",
        hcn_version: "GH",
        dob: (1947, 1, 9),
        sex: "M",
        mrp: "100200",
        appointment: "11:00",
        reason: "COPD, medication review",
    },
    Patient {
        demographic_no: "1005",
        family: "Singh",
        given: "Priya",
        hcn: "1357924685",
        hcn_version: "IJ",
        dob: (2016, 9, 30),
        sex: "F",
        mrp: PROVIDER_NO,
        appointment: "11:45",
        reason: "Well-child visit",
    },
];

pub fn patient(demographic_no: &str) -> Option<&'static Patient> {
    PATIENTS.iter().find(|p| p.demographic_no == demographic_no)
}

/// HL7 v3 codes a clinician may give for overriding a consent directive.
pub const OVERRIDE_REASONS: &[(&str, &str)] = &[
    ("EMRGONLY", "Emergency only"),
    ("PROFJUDG", "Professional judgment"),
    ("ETREAT", "Emergency treatment"),
    ("PATCONS", "Patient consented (verbal)"),
];

/// Made-up lab results: (test, value, unit, reference range, date).
pub fn labs(
    p: &Patient,
) -> Vec<(
    &'static str,
    String,
    &'static str,
    &'static str,
    &'static str,
)> {
    let seed: u32 = p.demographic_no.parse().unwrap_or(1);
    vec![
        (
            "Hemoglobin A1c",
            format!("{:.1}", 5.6 + (seed % 7) as f32 * 0.4),
            "%",
            "4.0–6.0",
            "2026-10-02",
        ),
        (
            "LDL cholesterol",
            format!("{:.1}", 2.1 + (seed % 5) as f32 * 0.3),
            "mmol/L",
            "< 3.5",
            "2026-10-02",
        ),
        (
            "eGFR",
            format!("{}", 68 + seed % 25),
            "mL/min/1.73m²",
            "> 60",
            "2026-09-14",
        ),
        (
            "Hemoglobin",
            format!("{}", 121 + seed % 30),
            "g/L",
            "120–160",
            "2026-09-14",
        ),
    ]
}

pub fn medications(p: &Patient) -> Vec<&'static str> {
    match p.demographic_no {
        "1001" => vec![
            "Metformin 500 mg PO BID",
            "Atorvastatin 20 mg PO daily",
            "Ramipril 5 mg PO daily",
        ],
        "1002" => vec!["ASA 81 mg PO daily (started by ED)"],
        "1003" => vec!["Prenatal multivitamin PO daily", "Folic acid 1 mg PO daily"],
        "1004" => vec![
            "Tiotropium 18 mcg inhaled daily",
            "Salbutamol 100 mcg 2 puffs PRN",
        ],
        _ => vec!["Vitamin D 400 IU PO daily"],
    }
}

pub fn visits(p: &Patient) -> Vec<(&'static str, &'static str, &'static str)> {
    let _ = p;
    vec![
        (
            "2026-10-20",
            "London Health Sciences Centre — ED",
            "Assessed and discharged",
        ),
        (
            "2026-08-03",
            "Maple Family Health Team",
            "Periodic health review",
        ),
        (
            "2026-04-11",
            "Windsor Regional Hospital — Lab",
            "Blood work",
        ),
    ]
}
