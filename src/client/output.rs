//! Printing results: JSON of the caller's view structs for scripts, or an
//! aligned table for people. Views are built by the command modules; this
//! module only lays them out.

use serde::Serialize;

use super::{ClientError, OutputFormat};

/// Rows under a header, printed as aligned columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells print empty.
    pub fn row(&mut self, cells: Vec<String>) -> &mut Table {
        self.rows.push(cells);
        self
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(widths.len()) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |f: &mut std::fmt::Formatter<'_>, cells: &mut dyn Iterator<Item = &str>| {
            let mut out = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = cells.next().unwrap_or("");
                if i + 1 == widths.len() {
                    out.push_str(cell);
                } else {
                    out.push_str(&format!("{cell:<w$}  "));
                }
            }
            writeln!(f, "{}", out.trim_end())
        };
        line(f, &mut self.headers.iter().copied())?;
        for row in &self.rows {
            line(f, &mut row.iter().map(String::as_str))?;
        }
        Ok(())
    }
}

/// Prints `value` as pretty JSON, or `table` for people.
pub fn emit<T: Serialize + ?Sized>(
    format: OutputFormat,
    value: &T,
    table: impl FnOnce() -> Table,
) -> Result<(), ClientError> {
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(value)?),
        OutputFormat::Table => print!("{}", table()),
    }
    Ok(())
}

/// `k=v,k=v` in key order, for map cells.
pub fn join_map(map: &std::collections::BTreeMap<String, String>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_to_the_widest_cell() {
        let mut t = Table::new(&["ID", "SIZE"]);
        t.row(vec!["a-long-id".into(), "1Gi".into()]);
        t.row(vec!["b".into(), "20Gi".into()]);
        assert_eq!(
            t.to_string(),
            "ID         SIZE\na-long-id  1Gi\nb          20Gi\n"
        );
    }

    #[test]
    fn an_empty_table_prints_its_header() {
        assert_eq!(Table::new(&["ID"]).to_string(), "ID\n");
    }
}
