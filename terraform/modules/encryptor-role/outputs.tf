output "role_arn" {
  description = "ARN of the encryptor role: role-to-assume in the CI workflow, and an encryptor principal of the kms-key module."
  value       = try(aws_iam_role.this.arn, null)
}

output "role_name" {
  description = "Name of the encryptor role."
  value       = try(aws_iam_role.this.name, null)
}

output "github_oidc_provider_arn" {
  description = "ARN of the GitHub OIDC provider the role trusts, or null without GitHub trust."
  value       = try(local.github_trust ? local.github_provider_arn : null, null)
}

output "github_subjects" {
  description = "The GitHub token subjects allowed to assume the role."
  value       = try(local.github_trust ? local.github_subjects : [], [])
}

output "policy_json" {
  description = "The role's KMS permissions policy (JSON)."
  value       = try(data.aws_iam_policy_document.kms.json, null)
}
