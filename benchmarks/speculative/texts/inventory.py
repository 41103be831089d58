import csv


def load_rows(path):
    rows = []
    f = open(path, newline="")
    for row in csv.DictReader(f):
        row["quantity"] = int(row["quantity"])
        row["price"] = float(row["price"])
        rows.append(row)
    f.close()
    return rows


def total_value(rows):
    total = 0.0
    for row in rows:
        total += row["quantity"] * row["price"]
    return total


def low_stock(rows, limit=5):
    return [row["name"] for row in rows if row["quantity"] < limit]


if __name__ == "__main__":
    rows = load_rows("inventory.csv")
    print("total value:", total_value(rows))
    print("low stock:", ", ".join(low_stock(rows)))
