output "key_arn" {
  description = "ARN of the KMS key: the --key-id for kmskeys encrypt and the resource in role policies."
  value       = try(aws_kms_key.this.arn, null)
}

output "key_id" {
  description = "ID of the KMS key."
  value       = try(aws_kms_key.this.key_id, null)
}

output "alias_name" {
  description = "Alias of the key."
  value       = try(aws_kms_alias.this.name, null)
}

output "alias_arn" {
  description = "ARN of the alias."
  value       = try(aws_kms_alias.this.arn, null)
}

output "key_policy" {
  description = "The key policy document (JSON)."
  value       = try(data.aws_iam_policy_document.this.json, null)
}

output "seal_key_arn" {
  description = "ARN of the seal key, or null when create_seal_key is false."
  value       = try(aws_kms_key.seal[0].arn, null)
}

output "seal_key_policy" {
  description = "The seal key's policy document (JSON), or null when create_seal_key is false."
  value       = try(data.aws_iam_policy_document.seal[0].json, null)
}
